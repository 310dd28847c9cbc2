"""LAE: online and offline (EMA) prefix PETs on one frozen ViT, max-confidence ensemble (tiny random ViT)."""
import pytest
import torch
import torch.nn.functional as F

from pilot.configure import build_config
from pilot.engine import Run, run_experiment
from pilot.learners import lae as lae_module
from pilot.modules.merge import ema_update
from pilot.modules.prompting import prefix_attention

from conftest import assert_resume_matches_uninterrupted, real_raw, requires_assets, tiny_raw


def lae_raw(tmp_path, **overrides) -> dict:
    raw = tiny_raw(tmp_path, model_name="lae", tuned_epoch=1, num_freeze_epochs=0, adapt_blocks=[0, 1], batch_size=8)
    raw.update(overrides)
    return raw


def pet_state(learner, name) -> dict:
    return {k: v.clone() for k, v in learner.net[name].state_dict().items()}


def test_offline_pet_is_the_ema_of_the_online_pet_from_the_second_task(tmp_path, monkeypatch):
    run = Run(build_config(lae_raw(tmp_path, tuned_epoch=2, num_freeze_epochs=1, ema_decay=0.5)))
    learner = run.learner
    sources = []

    def recording_ema_update(target, source, alpha):
        sources.append({k: v.clone() for k, v in source.state_dict().items()})
        ema_update(target, source, alpha)

    monkeypatch.setattr(lae_module, "ema_update", recording_ema_update)
    learner.fit(run.stream.tasks[0])
    assert not sources, "no offline PET during the first task"
    online_after_first = pet_state(learner, "online")
    learner.fit(run.stream.tasks[1])  # 16 images, batch 8: 2 steps per epoch, 2 epochs
    assert len(sources) == 4
    # the first epoch of a later task trains the head only
    assert all(torch.equal(sources[i][k], v) for i in (0, 1) for k, v in online_after_first.items())
    assert not torch.equal(sources[3]["tokens.prompts"], online_after_first["tokens.prompts"])
    expected = online_after_first  # the offline PET starts as a copy of the online one
    for online in sources:
        expected = {k: 0.5 * expected[k] + 0.5 * online[k] for k in expected}
    for key, value in learner.net["offline"].state_dict().items():
        torch.testing.assert_close(value, expected[key])


def test_prediction_takes_per_class_the_more_confident_pet(tmp_path):
    run = Run(build_config(lae_raw(tmp_path, ema_decay=0.5)))
    learner, tasks = run.learner, run.stream.tasks
    images = next(iter(run.ctx.eval_loader(tasks[0].test)))[0]

    def probabilities(pet, seen):
        with torch.no_grad():
            return F.softmax(learner.pet_logits(images, learner.net[pet])[:, :seen], dim=1)

    learner.fit(tasks[0])  # the online PET alone predicts
    torch.testing.assert_close(learner.predict(tasks[0].test)[: len(images)], probabilities("online", 4).log())
    learner.fit(tasks[1])
    online, offline = probabilities("online", 6), probabilities("offline", 6)
    assert not torch.allclose(online, offline)
    torch.testing.assert_close(learner.predict(tasks[0].test)[: len(images)], torch.maximum(online, offline).log())


@pytest.mark.parametrize("freeze_first_task", [False, True])
def test_the_pet_is_frozen_in_the_first_task_only_under_pilots_rule(tmp_path, freeze_first_task):
    run = Run(build_config(lae_raw(tmp_path, tuned_epoch=2, num_freeze_epochs=1,
                                   freeze_first_task=freeze_first_task)))
    learner = run.learner
    initial, at_epoch_start, begin_epoch = pet_state(learner, "online"), [], learner.begin_epoch

    def recording_begin_epoch(task, epoch):
        begin_epoch(task, epoch)
        at_epoch_start.append((pet_state(learner, "online"), learner.net["online"].tokens.prompts.requires_grad))

    learner.begin_epoch = recording_begin_epoch
    learner.fit(run.stream.tasks[0])
    (_, trains_first), (after_first, trains_second) = at_epoch_start
    assert (trains_first, trains_second) == (not freeze_first_task, True)
    moved_in_first = not torch.equal(after_first["tokens.prompts"], initial["tokens.prompts"])
    assert moved_in_first != freeze_first_task
    assert not torch.equal(pet_state(learner, "online")["tokens.prompts"], after_first["tokens.prompts"])


def test_offline_pet_from_the_start_is_the_ema_from_the_first_step_and_votes_in_the_first_task(tmp_path, monkeypatch):
    run = Run(build_config(lae_raw(tmp_path, ema_decay=0.5, offline_from_start=True)))
    learner, tasks = run.learner, run.stream.tasks
    images = next(iter(run.ctx.eval_loader(tasks[0].test)))[0]
    expected, sources = pet_state(learner, "online"), []  # the offline PET starts as the online one
    assert all(torch.equal(v, learner.net["offline"].state_dict()[k]) for k, v in expected.items())

    def recording_ema_update(target, source, alpha):
        sources.append({k: v.clone() for k, v in source.state_dict().items()})
        ema_update(target, source, alpha)

    monkeypatch.setattr(lae_module, "ema_update", recording_ema_update)
    learner.fit(tasks[0])
    with torch.no_grad():  # both PETs vote after the first task
        online, offline = (F.softmax(learner.pet_logits(images, learner.net[pet])[:, :4], dim=1)
                           for pet in ("online", "offline"))
    assert not torch.allclose(online, offline)
    torch.testing.assert_close(learner.predict(tasks[0].test)[: len(images)], torch.maximum(online, offline).log())
    learner.fit(tasks[1])  # not copied from the online PET when the second task starts
    assert len(sources) == 4 + 2  # 32 and 16 images, batch 8, 1 epoch
    for online in sources:
        expected = {k: 0.5 * expected[k] + 0.5 * online[k] for k in expected}
    for key, value in learner.net["offline"].state_dict().items():
        torch.testing.assert_close(value, expected[key])


def test_pilots_head_is_kaiming_uniform_with_zero_bias_and_the_default_is_the_official_normal(tmp_path):
    default = Run(build_config(lae_raw(tmp_path / "default"))).learner
    assert (default.config.head_init, default.config.freeze_first_task, default.config.offline_from_start) == \
        ("normal", False, False)
    torch.testing.assert_close(default.net["head"].weight.std().item(), 0.001, rtol=0.05, atol=0)
    kaiming = Run(build_config(lae_raw(tmp_path / "kaiming", head_init="kaiming"))).learner.net["head"]
    bound = (3 / kaiming.in_features) ** 0.5  # Kaiming uniform, gain 1 (a linear layer): U(+-sqrt(3 / fan_in))
    assert kaiming.weight.abs().max() <= bound and kaiming.weight.abs().max() > 0.99 * bound
    torch.testing.assert_close(kaiming.weight.std().item(), bound / 3 ** 0.5, rtol=0.05, atol=0)
    assert torch.equal(kaiming.bias, torch.zeros_like(kaiming.bias))


def test_the_vit_stays_frozen_and_is_not_copied(tmp_path):
    run = Run(build_config(lae_raw(tmp_path)))
    vit_weights = {k: v.clone() for k, v in run.ctx.backbone.state_dict().items()}
    run.execute()
    assert all(torch.equal(v, run.ctx.backbone.state_dict()[k]) for k, v in vit_weights.items())
    assert set(run.learner.net) == {"online", "offline", "head"}
    assert not any(p.requires_grad for p in run.learner.net["offline"].parameters())


def test_compensated_prefix_attention_rescales_the_prefix_weights_to_sum_to_one(tmp_path):
    run = Run(build_config(lae_raw(tmp_path)))
    attention, handle = run.ctx.backbone.model.blocks[0].attn, run.learner.prompts
    torch.manual_seed(0)
    x, key_prefix, value_prefix = torch.randn(2, 5, 192), torch.randn(2, 3, 192), torch.randn(2, 3, 192)
    with torch.no_grad():
        q, k, v = attention.qkv(x).reshape(2, 5, 3, 3, 64).permute(2, 0, 3, 1, 4)
        kp, vp = (p.reshape(2, 3, 3, 64).transpose(1, 2) for p in (key_prefix, value_prefix))
        token_scores, prefix_scores = (q @ k.transpose(-2, -1)) * 64 ** -0.5, (q @ kp.transpose(-2, -1)) * 64 ** -0.5
        prefix_mass = prefix_scores.exp().sum(-1, keepdim=True)
        keep = token_scores.exp().sum(-1, keepdim=True) / (token_scores.exp().sum(-1, keepdim=True) + prefix_mass)
        out = keep * token_scores.softmax(-1) @ v + prefix_scores.softmax(-1) @ vp
        expected = attention.proj(out.transpose(1, 2).reshape(2, 5, 192))
        torch.testing.assert_close(prefix_attention(attention, x, key_prefix, value_prefix, compensated=True), expected)
        with handle.use(prefixes={0: (key_prefix, value_prefix)}):
            torch.testing.assert_close(attention(x), expected)
        torch.testing.assert_close(attention(x), type(attention).forward(attention, x))


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    overrides = dict(tuned_epoch=2, num_freeze_epochs=1, ema_decay=0.5)
    uninterrupted, _ = assert_resume_matches_uninterrupted(
        lambda folder: build_config(lae_raw(tmp_path / folder, **overrides)))
    assert uninterrupted["status"] == "complete" and len(uninterrupted["accuracy_curve"]) == 4


@pytest.mark.parametrize("overrides, message", [
    ({"num_freeze_epochs": 1}, r"num_freeze_epochs \(1\) must lie in 0..tuned_epoch - 1 \(0\)"),
    ({"pet_cls": "Adapter"}, "pet_cls 'Adapter' is not implemented"),
    ({"head_init": "xavier"}, "head_init must be one of trunc_normal, normal, kaiming"),
    ({"adapt_blocks": [0, 4]}, r"adapt_blocks \[0, 4\] names blocks outside the backbone's 0..1"),
])
def test_bad_settings_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(Exception, match=message):
        Run(build_config(lae_raw(tmp_path, **overrides)))


@pytest.mark.slow
@requires_assets
def test_real_deit_tiny_smoke(tmp_path):
    """Real weights and images through both PETs (P1 measures accuracy)."""
    config = build_config(real_raw(
        tmp_path, model_name="lae", train_per_class=3, test_per_class=2, max_tasks=2,
        tuned_epoch=2, num_freeze_epochs=1, batch_size=3,
    ))
    (result,) = run_experiment(config)
    # 10-way chance is 10%. A head trained so (20 Adam steps, 30 images) on frozen features reaches
    # 45-55% over seeds.
    assert result["accuracy_curve"][0] >= 30
