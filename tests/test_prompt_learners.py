"""L2P, DualPrompt and CODA-Prompt on the shared loop (tiny random ViT, synthetic images)."""
import numpy as np
import pytest
import torch

from pilot.configure import build_config
from pilot.data.stream import Split
from pilot.engine import Run

from conftest import assert_resume_matches_uninterrupted, real_raw, requires_assets, tiny_raw

PROMPT_LEARNERS = ["l2p", "dualprompt", "coda_prompt"]
# Five blocks: DualPrompt's prefixes go to blocks 0-4, CODA's to 0-4.
FIVE_BLOCKS = {"img_size": 32, "patch_size": 8, "depth": 5}


def prompt_config(tmp_path, name, **overrides):
    raw = tiny_raw(tmp_path, model_name=name, backbone_args=FIVE_BLOCKS, tuned_epoch=1, batch_size=8)
    raw.update(overrides)
    return build_config(raw)


@pytest.fixture(params=PROMPT_LEARNERS)
def trained_run(request, tmp_path):
    """A run of the learner through all 4 tasks, with the backbone's weights before training."""
    run = Run(prompt_config(tmp_path, request.param))
    before = {k: v.clone() for k, v in run.ctx.backbone.state_dict().items()}
    result = run.execute()
    return run, before, result


def test_trains_end_to_end_and_keeps_the_backbone_frozen(trained_run):
    run, before, result = trained_run
    assert result["status"] == "complete" and len(result["accuracy_curve"]) == 4
    after = run.ctx.backbone.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "frozen ViT weights changed"
    assert any(p.requires_grad for p in run.learner.net.parameters())
    assert not any(p.requires_grad for p in run.ctx.backbone.parameters())


def test_test_queries_are_encoded_once_per_run(trained_run):
    run, _, result = trained_run
    # Only the (unaugmented) test images go through the query store, each once, although after
    # task t the test images of all earlier tasks are evaluated again.
    test_images = sum(len(task.test) for task in run.stream.tasks)
    assert result["timings"]["encoded_images"] == test_images


def test_predictions_do_not_depend_on_the_batch(trained_run):
    run, _, _ = trained_run
    parts = [task.test for task in run.stream.tasks]
    rng = np.random.RandomState(0)
    order = rng.permutation(sum(len(p) for p in parts))
    mixed = Split("test", parts[0].source, np.concatenate([p.indices for p in parts])[order],
                  np.concatenate([p.labels for p in parts])[order])
    run.ctx.experiment.eval_batch_size = 1
    one_by_one = run.learner.predict(mixed)
    run.ctx.experiment.eval_batch_size = 64
    all_at_once = run.learner.predict(mixed)
    torch.testing.assert_close(one_by_one, all_at_once, rtol=1e-4, atol=1e-4)
    assert torch.equal(one_by_one.argmax(1), all_at_once.argmax(1))


def test_resume_matches_an_uninterrupted_run(tmp_path):
    assert_resume_matches_uninterrupted(lambda folder: prompt_config(tmp_path / folder, "coda_prompt"))


def test_logits_of_other_tasks_are_masked_in_training(tmp_path):
    run = Run(prompt_config(tmp_path, "l2p"))
    task = run.stream.tasks[1]
    run.learner.fit(run.stream.tasks[0])
    head_before = run.learner.net["head"].weight.detach().clone()
    run.learner.fit(task)
    changed = (run.learner.net["head"].weight.detach() - head_before).abs().sum(1) > 0
    # only the rows of task 1's classes receive gradient from the cross-entropy
    assert changed[task.classes.start:task.classes.stop].all()
    assert not changed[: task.classes.start].any() and not changed[task.classes.stop:].any()


def test_prompt_layers_outside_the_backbone_are_a_clear_error(tmp_path):
    with pytest.raises(Exception, match=r"e_prompt_layer_idx \[2, 3, 4\] names blocks outside the backbone's 0..1"):
        Run(build_config(tiny_raw(tmp_path, model_name="dualprompt")))


@pytest.mark.slow
@requires_assets
@pytest.mark.parametrize("name", PROMPT_LEARNERS)
def test_real_deit_tiny_smoke(tmp_path, name):
    """Real weights and images through the whole path; accuracy is checked on protocol P1 (docs/benchmarks.md)."""
    config = build_config(real_raw(
        tmp_path, model_name=name, train_per_class=2, test_per_class=2, max_tasks=1,
        tuned_epoch=1, batch_size=10,
    ))
    run = Run(config)
    weights = {k: v.clone() for k, v in run.ctx.backbone.state_dict().items()}
    learnt = {k: v.clone() for k, v in run.learner.net.state_dict().items()}
    result = run.execute()
    assert result["completed_tasks"] == 1 and result["timings"]["encoded_images"] == 20
    assert all(torch.equal(v, run.ctx.backbone.state_dict()[k]) for k, v in weights.items())
    assert any(not torch.equal(v, run.learner.net.state_dict()[k]) for k, v in learnt.items())
