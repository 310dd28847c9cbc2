"""DAP: prompts generated per image and per block (pilot.modules.prompt_generation) on the shared loop."""
import math

import numpy as np
import pytest
import torch

from pilot.configure import build_config
from pilot.data.stream import Split
from pilot.engine import Run
from pilot.errors import PilotError
from pilot.modules.prompt_generation import GeneratedPrompts, PromptGenerator

from conftest import killed_then_resumed, real_raw, requires_assets, run_recording_each_task, tiny_raw


def dap_config(tmp_path, **overrides):
    settings = {"tuned_epoch": 1, "batch_size": 8, "num_dap_tokens": 3, "max_tasks": 3, "train_per_class": 4,
                "test_per_class": 2, **overrides}
    return build_config(tiny_raw(tmp_path, model_name="dap", **settings))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A DAP run through 3 tasks, with the backbone's weights before training and the generator's after
    each task."""
    run = Run(dap_config(tmp_path_factory.mktemp("dap")))
    return (run, *run_recording_each_task(run))


def test_generated_prompt_equals_the_network_written_out():
    generator = PromptGenerator(num_blocks=1, num_tokens=3, embed_dim=2, length=2, pool_size=2, embedding_dim=2)
    with torch.no_grad():
        generator.norm[0].weight.copy_(torch.tensor([2.0, 0.5]))
        generator.norm[0].bias.copy_(torch.tensor([0.1, -0.2]))
        generator.downsample[0].weight.copy_(torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, 1.0]]))
        generator.downsample[0].bias.copy_(torch.tensor([0.3, -0.4]))
        generator.film[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [-1.0, 1.0]]))
        generator.film[0].bias.copy_(torch.tensor([0.5, 0.0, 0.0, 1.0]))
    tokens = [[3.0, 1.0], [0.0, 2.0], [-1.0, -1.0]]  # T=3 tokens of width D=2
    embedding = [1.0, 2.0]
    # by hand: LayerNorm of each token over its D=2 values (eps 1e-6)
    normed = []
    for token in tokens:
        mean = sum(token) / 2
        var = sum((v - mean) ** 2 for v in token) / 2
        normed.append([(v - mean) / math.sqrt(var + 1e-6) * w + b for v, w, b in zip(token, [2.0, 0.5], [0.1, -0.2])])
    W, b = [[1.0, -1.0, 0.5], [0.0, 2.0, 1.0]], [0.3, -0.4]
    down = [[sum(W[l][t] * normed[t][d] for t in range(3)) + b[l] for l in range(2)] for d in range(2)]  # [D][L]
    film = [1.0 * 1 + 0.5, 2.0, 2.0 * 1 + 1.0 * 2, -1.0 + 2.0 + 1.0]  # F e + c
    gamma, beta = film[:2], film[2:]
    gamma = [g / math.hypot(*gamma) for g in gamma]
    beta = [v / math.hypot(*beta) for v in beta]
    expected = [[gamma[d] * down[d][l] + beta[d] for d in range(2)] for l in range(2)]  # [L][D]
    prompts = generator.generate(0, torch.tensor([tokens]), torch.tensor([embedding]))
    torch.testing.assert_close(prompts, torch.tensor([expected]), rtol=1e-5, atol=1e-5)


def test_every_block_gets_prompts_generated_from_its_own_input(tiny_config):
    vit = Run(tiny_config()).ctx.backbone.model
    handle = GeneratedPrompts(vit)
    generator = PromptGenerator(len(vit.blocks), handle.num_tokens, vit.embed_dim, length=3, pool_size=2)
    with torch.no_grad():
        for layer in generator.downsample:
            layer.weight.normal_()
    images = torch.randn(2, 3, 32, 32)
    embedding = generator.task_embedding(torch.tensor([0, 1]))
    stock = vit.forward_features(images)
    with torch.no_grad(), handle.use(generator, embedding):
        prompted = vit.forward_features(images)
        # written out: drop the previous block's prompts, generate from what is left, insert after [CLS]
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for j, block in enumerate(vit.blocks):
            if j > 0:
                x = torch.cat([x[:, :1], x[:, 4:]], dim=1)
            x = torch.cat([x[:, :1], generator.generate(j, x, embedding), x[:, 1:]], dim=1)
            x = block.forward(x)  # forward() skips the hooks
        expected = vit.norm(x)
    assert prompted.shape[1] == stock.shape[1] + 3
    torch.testing.assert_close(prompted, expected)
    torch.testing.assert_close(vit.forward_features(images), stock, rtol=0, atol=0)  # outside `use`: stock
    handle.remove()


def test_keys_per_image_by_the_task_in_training_or_by_a_batch_vote():
    generator = PromptGenerator(num_blocks=1, num_tokens=2, embed_dim=3, length=1, pool_size=3)
    with torch.no_grad():
        generator.keys.copy_(torch.eye(3))
    queries = torch.tensor([[1.0, 0.1, 0], [0, 2.0, 0], [0.1, 0, 1.0], [0, 1.0, 0.2]])  # keys 0, 1, 2, 1
    similarity = generator.similarity(queries)
    torch.testing.assert_close(similarity, torch.nn.functional.normalize(queries, dim=1))
    assert generator.choose(similarity).tolist() == [0, 1, 2, 1]
    assert generator.choose(similarity, batchwise=True).tolist() == [1, 1, 1, 1]
    assert generator.choose(similarity, force_index=2).tolist() == [2, 2, 2, 2]


def test_the_loss_pulls_the_task_key_to_the_query(trained_run):
    run, _, _, _ = trained_run
    learner, task = run.learner, run.stream.tasks[1]
    images = torch.randn(3, 3, 32, 32)
    query = learner.query(images)
    logits, extra = learner.prompted_outputs(images, query, task)
    cosine = torch.nn.functional.cosine_similarity(query, learner.net["dap"].keys[1].expand(3, -1))
    torch.testing.assert_close(extra, -0.1 * cosine.mean())
    assert logits.shape == (3, run.ctx.protocol.num_classes)


def test_backbone_stays_bit_identical_and_projections_train_on_the_first_task_only(trained_run):
    run, before, after_task, _ = trained_run
    after = run.ctx.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "frozen ViT weights changed"
    downsample = [k for k in after_task[0] if ".downsample." in k]
    assert downsample and any(after_task[0][k].abs().sum() > 0 for k in downsample)  # trained from zero on task 1
    assert all(torch.equal(after_task[0][k], after_task[2][k]) for k in downsample)
    assert not torch.equal(after_task[0]["dap.film.0.weight"], after_task[2]["dap.film.0.weight"])


def test_predictions_do_not_depend_on_the_batch_by_default(trained_run):
    run, _, _, _ = trained_run
    parts = [task.test for task in run.stream.tasks]
    order = np.random.RandomState(0).permutation(sum(len(p) for p in parts))
    mixed = Split("test", parts[0].source, np.concatenate([p.indices for p in parts])[order],
                  np.concatenate([p.labels for p in parts])[order])
    run.ctx.experiment.eval_batch_size = 7
    in_sevens = run.learner.predict(mixed)
    run.ctx.experiment.eval_batch_size = 64
    all_at_once = run.learner.predict(mixed)
    torch.testing.assert_close(in_sevens, all_at_once, rtol=1e-4, atol=1e-4)
    assert not run.learner.batch_dependent_evaluation


def test_batchwise_vote_is_opt_in_and_recorded(tmp_path):
    with pytest.warns(UserWarning, match="each test batch votes on one task key"):
        config = dap_config(tmp_path, batchwise_prompt=True, batch_size=5)
    run = Run(config)
    learner = run.learner
    assert learner.batch_dependent_evaluation and learner.test_batch_size == 5
    learner.num_seen, learner._choices = 4, []
    with torch.no_grad():
        keys = learner.net["dap"].keys  # keys that split the images between them (alone: 1, 7, 7, 7, 7 | 8, 2, 2)
        keys.copy_(torch.randn(keys.shape, generator=torch.Generator().manual_seed(0)))
    learner.predict(run.stream.tasks[0].test)
    assert [len(batch) for batch in learner._choices] == [5, 3]
    assert all(len(batch.unique()) == 1 for batch in learner._choices)  # one key per batch


def test_resume_matches_an_uninterrupted_run(trained_run, tmp_path):
    uninterrupted = trained_run[3]
    resumed = killed_then_resumed(dap_config(tmp_path))
    assert resumed["counts"] == uninterrupted["counts"]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"]


@pytest.mark.parametrize("overrides, message", [
    ({"prompt_pool": 2}, r"prompt_pool \(2\) must be at least the number of tasks \(4\)"),
    ({"num_dap_tokens": 0}, r"num_dap_tokens, task_emb and prompt_pool must be >= 1"),
    ({"adam_betas": [0.9]}, r"adam_betas must be two numbers"),
])
def test_bad_settings_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(PilotError, match=message):
        Run(dap_config(tmp_path, **overrides))


@pytest.mark.slow
@requires_assets
def test_real_deit_tiny_smoke(tmp_path):
    """Real weights and images through the whole path; accuracy is measured on protocol P1 (docs/benchmarks.md)."""
    run = Run(build_config(real_raw(tmp_path, model_name="dap", train_per_class=2, test_per_class=2, max_tasks=1,
                                    tuned_epoch=1, batch_size=10)))
    weights = {k: v.clone() for k, v in run.ctx.backbone.state_dict().items()}
    result = run.execute()
    assert result["completed_tasks"] == 1
    assert all(torch.equal(v, run.ctx.backbone.state_dict()[k]) for k, v in weights.items())
