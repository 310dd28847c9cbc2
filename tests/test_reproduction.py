"""The reproduction paths: PILOT's preprocessing profile, batch-wise prompts, CODA-Prompt's schedule."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pilot.configure import build_config
from pilot.data.stream import Split
from pilot.data.transforms import DataConfig, Preprocessing
from pilot.engine import Run, run_experiment
from pilot.errors import PilotError
from pilot.learners._gradient import make_scheduler
from pilot.learners._prompt import class_sorted
from pilot.modules.prompting import PromptPool, majority_entries

from conftest import tiny_raw
from test_prompt_learners import prompt_config

DEIT = DataConfig(size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic",
                  crop_pct=0.9)


@pytest.fixture
def cifar_image():
    """A fixed 32 x 32 RGB image, as PILOT feeds CIFAR arrays (Image.fromarray)."""
    return Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8))


def seeded(transform, image, seed=0):
    torch.manual_seed(seed)
    return transform(image)


def test_pilot_profile_is_pilots_build_transform(cifar_image):
    # PILOT utils/data.py build_transform: test Resize(int(256 / 224 * 224), interpolation=3) + CenterCrop(224)
    # + ToTensor; train RandomResizedCrop(224, scale=(0.05, 1.0), ratio=(3/4, 4/3)) + flip + ToTensor.
    pilots_test = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor()])
    pilots_train = T.Compose([T.RandomResizedCrop(224, scale=(0.05, 1.0), ratio=(3. / 4., 4. / 3.)),
                              T.RandomHorizontalFlip(p=0.5), T.ToTensor()])
    profile = Preprocessing("pilot", DEIT, resize=True)
    assert torch.equal(profile.eval()(cifar_image), pilots_test(cifar_image))
    for seed in range(3):
        assert torch.equal(seeded(profile.train(), cifar_image, seed), seeded(pilots_train, cifar_image, seed))
    assert 0 <= profile.eval()(cifar_image).min() and profile.eval()(cifar_image).max() <= 1  # no normalisation


def test_pilot_profile_of_coda_prompt_is_pilots_coda_branch(cifar_image):
    # PILOT build_transform_coda_prompt (cifar): test Resize(224) + ToTensor + Normalize((0,0,0), (1,1,1));
    # train RandomResizedCrop(224) + RandomHorizontalFlip() + ToTensor + the same Normalize.
    identity = T.Normalize((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    pilots_test = T.Compose([T.Resize(224), T.ToTensor(), identity])
    pilots_train = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), identity])
    profile = Preprocessing("pilot", DEIT, resize=True, pilot_variant="coda_prompt")
    assert torch.equal(profile.eval()(cifar_image), pilots_test(cifar_image))
    for seed in range(3):
        assert torch.equal(seeded(profile.train((0.08, 1.0)), cifar_image, seed),
                           seeded(pilots_train, cifar_image, seed))


def test_official_profiles_are_the_official_repositories_transforms(cifar_image):
    bicubic = T.InterpolationMode.BICUBIC
    # SLCA's utils/data.py iCIFAR100_224: train RandomResizedCrop(224, interpolation=3) + flip +
    # ColorJitter(brightness=63/255), test Resize(256, interpolation=3) + CenterCrop(224); common
    # ToTensor + Normalize with CIFAR-100's mean and std.
    cifar = T.Normalize((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
    slca_train = T.Compose([T.RandomResizedCrop(224, interpolation=bicubic), T.RandomHorizontalFlip(),
                            T.ColorJitter(brightness=63 / 255), T.ToTensor(), cifar])
    slca_test = T.Compose([T.Resize(256, interpolation=bicubic), T.CenterCrop(224), T.ToTensor(), cifar])
    slca = Preprocessing("official", DEIT, resize=True, official_variant="slca", dataset="cifar224")
    assert torch.equal(slca.eval()(cifar_image), slca_test(cifar_image))
    assert torch.equal(seeded(slca.train(), cifar_image), seeded(slca_train, cifar_image))
    # LAE: RandomResizedCrop(224) + flip; Resize(256) + CenterCrop(224); no normalisation.
    lae = Preprocessing("official", DEIT, resize=True, official_variant="lae")
    assert torch.equal(lae.eval()(cifar_image), T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])(cifar_image))
    assert torch.equal(seeded(lae.train(), cifar_image),
                       seeded(T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor()]), cifar_image))
    with pytest.raises(PilotError, match="no official transforms are recorded for simplecil"):
        Preprocessing("official", DEIT, resize=True, learner="simplecil")
    with pytest.raises(PilotError, match="SLCA's CIFAR-100 transform"):
        Preprocessing("official", DEIT, resize=True, official_variant="slca", learner="slca", dataset="imagenetr")


def test_backbone_profile_is_unchanged(cifar_image):
    backbone_test = T.Compose([T.Resize(248, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                               T.ToTensor(), T.Normalize(DEIT.mean, DEIT.std)])
    assert torch.equal(Preprocessing("backbone", DEIT, resize=True).eval()(cifar_image), backbone_test(cifar_image))


def test_profile_reaches_the_run_and_bad_values_are_clear_errors(tmp_path):
    run = Run(build_config(tiny_raw(tmp_path, preprocess="pilot")))
    assert not any(isinstance(step, T.Normalize) for step in run.ctx.eval_transform.transforms)
    result = run.execute()
    assert result["config"]["preprocess"] == "pilot" and result["batch_dependent_evaluation"] is False
    coda = Run(prompt_config(tmp_path / "coda", "coda_prompt", preprocess="pilot"))
    assert [type(step) for step in coda.ctx.eval_transform.transforms] == [T.Resize, T.ToTensor]
    with pytest.raises(PilotError, match="preprocess must be one of backbone, pilot, official, got 'timm'"):
        Run(build_config(tiny_raw(tmp_path, preprocess="timm")))
    with pytest.raises(PilotError, match="cifar100"):
        Preprocessing("pilot", DEIT, resize=False)


# --- CODA-Prompt's schedule ------------------------------------------------------------------------


def learning_rates(config, cosine, epochs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.init_lr)
    scheduler = make_scheduler(optimizer, config, cosine)
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_coda_schedule_gives_the_formulas_rates_per_epoch(tmp_path):
    run = Run(prompt_config(tmp_path, "coda_prompt", tuned_epoch=20, init_lr=0.001, scheduler="cosine"))
    assert run.learner.cosine_schedule == "coda_cosine"
    # CODA's CosineSchedule (official and PILOT): epoch 0 at lr, then epoch e at lr cos(99 pi (e - 1) / (200 (K - 1))).
    expected = [0.001] + [0.001 * math.cos(99 * math.pi * e / (200 * 19)) for e in range(19)]
    rates = learning_rates(run.learner.config, run.learner.cosine_schedule, 20)
    assert rates == pytest.approx(expected, rel=1e-12)
    assert rates[2] == pytest.approx(9.967e-4, abs=1e-7) and rates[19] == pytest.approx(9.740e-5, abs=1e-8)
    # torch's CosineAnnealingLR, what "cosine" means for the other learners, stays one key away.
    annealing = learning_rates(run.learner.config, "cosine_annealing", 20)
    assert annealing[1] == pytest.approx(1e-5 + (0.001 - 1e-5) * (1 + math.cos(math.pi / 20)) / 2)
    explicit = Run(prompt_config(tmp_path / "explicit", "coda_prompt", tuned_epoch=20, scheduler="cosine_annealing"))
    assert learning_rates(explicit.learner.config, explicit.learner.cosine_schedule, 20) == pytest.approx(annealing)
    l2p = Run(prompt_config(tmp_path / "l2p", "l2p"))
    assert l2p.learner.cosine_schedule == "cosine_annealing"


# --- batch-wise prompt selection ----------------------------------------------------------------


def test_majority_vote_on_a_hand_built_batch():
    # Per-sample top-2 choices of 4 samples: entry 3 chosen 4 times, entry 1 three times, 0 once.
    choices = torch.tensor([[3, 1], [1, 3], [3, 0], [3, 1]])
    assert sorted(majority_entries(choices, pool_size=6)[0].tolist()) == [1, 3]
    pool = PromptPool(pool_size=4, length=2, embed_dim=3, top_k=1)
    with torch.no_grad():
        pool.keys.copy_(torch.eye(4, 3) + torch.tensor([[0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 1, 1.0]]))
    queries = torch.tensor([[1.0, 0, 0], [1.0, 0.1, 0], [0, 1.0, 0], [0.9, 0, 0.1]])  # entries 0, 0, 1, 0 alone
    assert pool.select(queries).indices[:, 0].tolist() == [0, 0, 1, 0]
    voted = pool.select(queries, batchwise=True)
    assert voted.indices[:, 0].tolist() == [0, 0, 0, 0]
    assert all(torch.equal(row, pool.select(queries[:1]).prompts[0]) for row in voted.prompts)  # entry 0's prompt


def mixed_test_split(run):
    parts = [task.test for task in run.stream.tasks]
    order = np.random.RandomState(0).permutation(sum(len(p) for p in parts))
    return Split("test", parts[0].source, np.concatenate([p.indices for p in parts])[order],
                 np.concatenate([p.labels for p in parts])[order])


def test_with_batchwise_prompts_predictions_depend_on_the_batch(tmp_path):
    with pytest.warns(UserWarning, match="accuracy depends on the test batches"):
        config = prompt_config(tmp_path, "l2p", batchwise_prompt=True)
    run = Run(config)
    mixed = mixed_test_split(run)
    run.learner.num_seen = 10  # untrained (as the per-image learner below): logits over every class
    run.learner.config.batch_size = 1  # a batch of one votes for its own choices
    one_by_one = run.learner.predict(mixed)
    run.learner.config.batch_size = 64
    all_at_once = run.learner.predict(mixed)
    assert not torch.equal(one_by_one.argmax(1), all_at_once.argmax(1))
    per_image = Run(prompt_config(tmp_path / "off", "l2p")).learner
    per_image.num_seen = 10
    torch.testing.assert_close(per_image.predict(mixed), one_by_one, rtol=1e-4, atol=1e-4)


def test_batchwise_evaluation_is_pilots_class_sorted_test_set(tmp_path):
    run = Run(prompt_config(tmp_path, "dualprompt", batchwise_prompt=True, batch_size=5))
    splits = [task.test for task in run.stream.tasks[:3]]
    union, position = class_sorted(splits)
    assert np.all(np.diff(union.labels) >= 0) and len(union) == sum(len(s) for s in splits)
    expected = run.learner.predict(union)[position]  # PILOT's batches: class-sorted, batch_size 5
    torch.testing.assert_close(torch.cat(run.learner.predict_tasks(splits)), expected)


@pytest.mark.parametrize("batchwise", [False, True])
def test_selection_diagnostics_are_logged_and_recorded(tmp_path, batchwise):
    (dual,) = run_experiment(prompt_config(tmp_path / "dual", "dualprompt", batchwise_prompt=batchwise))
    (l2p,) = run_experiment(prompt_config(tmp_path / "l2p", "l2p", batchwise_prompt=batchwise))
    assert dual["batch_dependent_evaluation"] is batchwise and l2p["batch_dependent_evaluation"] is batchwise
    for row in dual["per_task"]:
        assert 0 <= row["task_identification_accuracy"] <= 100
    for row in l2p["per_task"]:  # tasks count from 1
        usage = row["prompt_usage"]
        assert len(usage) == 10 and sum(usage) == 5 * sum(4 * 4 if t == 0 else 4 * 2 for t in range(row["task"]))
    log = next((tmp_path / "dual").rglob("run.log")).read_text()
    assert "task 4 task identification accuracy" in log


def test_task_identification_counts_images_whose_e_prompt_is_their_tasks(tmp_path):
    run = Run(prompt_config(tmp_path, "dualprompt"))
    learner = run.learner
    for task in run.stream.tasks[:2]:
        learner.fit(task)
    splits = [task.test for task in run.stream.tasks[:2]]
    learner.predict_tasks(splits)
    queries = torch.cat([run.ctx.features(split) for split in splits])
    chosen = learner.net["e_pool"].select(queries).indices[:, 0]
    own = torch.cat([torch.full((len(split),), t) for t, split in enumerate(splits)])
    expected = 100.0 * (chosen == own).double().mean().item()
    assert learner.evaluation_report()["task_identification_accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize("position", ["cls", "none"])
def test_l2p_prompt_tokens_carry_the_class_tokens_position_embedding(tmp_path, position):
    """The official resize_pos_embed copies the [CLS] position embedding onto every prompt position."""
    run = Run(prompt_config(tmp_path, "l2p", prompt_position=position))
    learner, vit = run.learner, run.learner.vit
    images = next(iter(run.ctx.eval_loader(run.stream.tasks[0].test)))[0][:3]
    query = run.ctx.backbone(images)
    with torch.no_grad():
        logits, _ = learner.prompted_outputs(images, query, None)
        tokens = learner.net["pool"].select(query).prompts[:, 0]
        added = vit.pos_embed[:, :1] if position == "cls" else torch.zeros(())
        with learner.prompts.use(prompt_tokens=tokens + added):
            features = vit.forward_features(images)
        expected = learner.net["head"](features[:, 1:1 + tokens.shape[1]].mean(1))
    torch.testing.assert_close(logits, expected)
    assert vit.pos_embed[:, :1].abs().sum() > 0
