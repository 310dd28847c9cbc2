"""Model reuse: transferability estimators, pilot select, random:/@k backbones, several backbones at once."""
import json

import numpy as np
import pytest
import torch

from pilot.backbones import BackboneSet, create_backbone
from pilot.cli import main
from pilot.configure import build_config
from pilot.engine import run_experiment
from pilot.errors import PilotError
from pilot.transferability import h_score, kendall_tau, leep, logme, ncm_accuracy

from conftest import TINY_VIT, real_raw, requires_assets, tiny_raw


def random_problem(seed=0, n=40, dim=6, classes=3):
    rng = np.random.RandomState(seed)
    labels = np.arange(n) % classes
    features = rng.normal(size=(n, dim)) + rng.normal(size=(classes, dim))[labels]
    return features, labels


def numpy_logme(f: np.ndarray, labels: np.ndarray) -> float:
    """The paper's evidence maximisation written out with a matrix inverse, iterated to its fixed point."""
    n, dim = f.shape
    evidences = []
    for label in np.unique(labels):
        y = (labels == label).astype(float)
        alpha, beta = 1.0, 1.0
        for _ in range(10000):
            a = alpha * np.eye(dim) + beta * f.T @ f
            a_inv = np.linalg.inv(a)
            m = beta * a_inv @ f.T @ y
            gamma = dim - alpha * np.trace(a_inv)
            new_alpha, new_beta = gamma / (m @ m), (n - gamma) / np.sum((f @ m - y) ** 2)
            done = abs(new_alpha / new_beta - alpha / beta) < 1e-13 * alpha / beta
            alpha, beta = new_alpha, new_beta
            if done:
                break
        a = alpha * np.eye(dim) + beta * f.T @ f
        m = beta * np.linalg.inv(a) @ f.T @ y
        evidence = (n / 2 * np.log(beta) + dim / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
                    - beta / 2 * np.sum((f @ m - y) ** 2) - alpha / 2 * m @ m - np.linalg.slogdet(a)[1] / 2)
        evidences.append(evidence / n)
    return float(np.mean(evidences))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logme_equals_the_papers_formulas(seed):
    features, labels = random_problem(seed)
    ours = logme(torch.tensor(features), torch.tensor(labels), iterations=10000, tolerance=1e-13)
    assert ours == pytest.approx(numpy_logme(features, labels), rel=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_h_score_equals_the_papers_formula(seed):
    features, labels = random_problem(seed)
    class_means = np.stack([features[labels == label].mean(0) for label in labels])
    expected = np.trace(np.linalg.pinv(np.cov(features, rowvar=False)) @ np.cov(class_means, rowvar=False))
    assert h_score(torch.tensor(features), torch.tensor(labels)) == pytest.approx(expected, rel=1e-9)


def test_ncm_accuracy_equals_leaving_each_image_out_in_turn():
    features, labels = random_problem(3, n=30, classes=4)
    features[labels == 0] += 0.5  # some overlap, so the answer is not 100
    correct = 0
    for i in range(len(labels)):
        keep = np.arange(len(labels)) != i
        means = np.stack([features[keep & (labels == c)].mean(0) for c in range(4)])
        cosine = means @ features[i] / np.linalg.norm(means, axis=1) / np.linalg.norm(features[i])
        correct += cosine.argmax() == labels[i]
    assert ncm_accuracy(torch.tensor(features), torch.tensor(labels)) == pytest.approx(100 * correct / len(labels))


def test_leep_equals_its_definition_on_a_hand_built_case():
    theta = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 0])
    # P(y, z) = 1/4 sum over images of class y: y=0 -> (1.9, 1.1)/4, y=1 -> (0.3, 0.7)/4; P(z) = (2.2, 1.8)/4
    p_y_given_z = np.array([[1.9 / 2.2, 1.1 / 1.8], [0.3 / 2.2, 0.7 / 1.8]])
    expected = np.mean([np.log(p_y_given_z[y] @ t) for t, y in zip(theta.numpy(), labels.numpy())])
    assert leep(theta, labels) == pytest.approx(expected, rel=1e-12)


def test_every_estimator_ranks_informative_features_above_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat_interleave(30)
    informative = 2 * torch.randn(5, 32, generator=generator)[labels] + torch.randn(150, 32, generator=generator)
    noise = torch.randn(150, 32, generator=generator)
    for estimate in (logme, h_score, ncm_accuracy):
        assert estimate(informative, labels) > estimate(noise, labels), estimate.__name__
    source_head = torch.randn(32, 10, generator=generator)
    assert leep(torch.softmax(informative @ source_head, 1), labels) > leep(torch.softmax(noise @ source_head, 1), labels)


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert kendall_tau([1, 2, 2], [1, 2, 3]) == pytest.approx(2 / np.sqrt(6))  # tau-b with a tie


# --- backbone variants -----------------------------------------------------------------------------


def test_random_weights_depend_on_the_seed_alone_also_in_a_set():
    alone = create_backbone("random:vit_tiny_patch16_224", seed=3, **TINY_VIT)
    pair = create_backbone(["vit_tiny_patch16_224", "random:vit_tiny_patch16_224"], pretrained=False, seed=3, **TINY_VIT)
    assert isinstance(pair, BackboneSet) and pair.feature_dim == 2 * alone.feature_dim
    member = pair.members[1].state_dict()
    assert all(torch.equal(value, member[key]) for key, value in alone.state_dict().items())
    assert alone.identity.endswith("random-seed3")


def test_keeping_the_first_blocks():
    full = create_backbone("vit_tiny_patch16_224", pretrained=False, **{**TINY_VIT, "depth": 3})
    truncated = create_backbone("vit_tiny_patch16_224@2", pretrained=False, **{**TINY_VIT, "depth": 3})
    assert len(truncated.model.blocks) == 2 and truncated.identity == full.identity + "@2"
    for bad, message in (("vit_tiny_patch16_224@4", "keeps 4 blocks, but the model has 3"),
                         ("vit_tiny_patch16_224@x", "give how many blocks to keep"),
                         ("resnet18@2", "needs a transformer with a stack of blocks")):
        with pytest.raises(PilotError, match=message):
            create_backbone(bad, pretrained=False, **({**TINY_VIT, "depth": 3} if "vit" in bad else {}))


# --- several backbones in one run ----------------------------------------------------------------------


def test_two_backbones_encode_each_image_once_each_and_reuse_single_runs_features(tmp_path):
    cache = str(tmp_path / "cache")
    pair = ["vit_tiny_patch16_224", "random:vit_tiny_patch16_224@1"]
    singles = [run_experiment(build_config(tiny_raw(tmp_path, backbone_type=b, seed=[2])))[0] for b in pair]
    (both,) = run_experiment(build_config(tiny_raw(tmp_path, backbone_type=pair, seed=[2])))
    assert both["timings"]["encoded_images"] == sum(s["timings"]["encoded_images"] for s in singles)
    assert [b["type"] for b in both["backbones"]] == pair and both["backbones"][1]["identity"].endswith("@1")
    assert both["run_dir"].endswith("2_vit_tiny_patch16_224+random-vit_tiny_patch16_224@1")
    # with a shared cache, the pair's features are the single runs' ones: nothing is encoded again
    for backbone in pair:
        run_experiment(build_config(tiny_raw(tmp_path, backbone_type=backbone, seed=[2], feature_cache_dir=cache,
                                             prefix="cached")))
    (cached,) = run_experiment(build_config(tiny_raw(tmp_path, backbone_type=pair, seed=[2], feature_cache_dir=cache,
                                                     prefix="cached")))
    assert cached["timings"]["encoded_images"] == 0 and cached["counts"] == both["counts"]


def test_the_pairs_features_are_each_backbones_normalised_side_by_side(tmp_path):
    from pilot.engine import Run

    pair = Run(build_config(tiny_raw(tmp_path, backbone_type=["vit_tiny_patch16_224", "random:vit_tiny_patch16_224@1"])))
    split = pair.stream.tasks[0].train
    members = [store(split) for store in pair.ctx.features.stores]
    joined = pair.ctx.features(split)
    assert joined.shape == (len(split), 2 * 192)
    for half, member in zip(joined.split(192, dim=1), members):
        assert torch.allclose(half, torch.nn.functional.normalize(member, dim=1))


def test_several_backbones_are_refused_for_a_learner_that_trains_the_backbone(tmp_path):
    for overrides in ({"model_name": "l2p"}, {"model_name": "ranpac"}):
        with pytest.raises(PilotError, match="only a learner that keeps the backbone frozen"):
            build_config(tiny_raw(tmp_path, backbone_type=["a", "b"], **overrides))
    build_config(tiny_raw(tmp_path, backbone_type=["a", "b"], model_name="ranpac", tuned_epoch=0))
    with pytest.raises(PilotError, match="'backbone_type' must be str or list, got int 3"):
        build_config(tiny_raw(tmp_path, backbone_type=3))


# --- pilot select -------------------------------------------------------------------------------------------


def test_pilot_select_ranks_writes_and_runs_the_best(tmp_path, capsys):
    raw = tiny_raw(tmp_path, feature_cache_dir=str(tmp_path / "cache"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    candidates = ["vit_tiny_patch16_224", "vit_tiny_patch16_224@1", "random:open_clip:ViT-S-32"]
    output = tmp_path / "selection.json"
    assert main(["select", "--config", str(path), "--candidates", ",".join(candidates), "--output", str(output),
                 "--run"]) == 0
    out = capsys.readouterr().out
    selection = json.loads(output.read_text())
    assert sorted(selection["ranking"]) == sorted(candidates) and selection["images"] == 4 * 8
    logme_scores = {row["backbone"]: row["scores"]["logme"] for row in selection["candidates"]}
    assert selection["ranking"] == sorted(candidates, key=lambda c: -logme_scores[c])
    by_name = {row["backbone"]: row for row in selection["candidates"]}
    assert by_name["random:open_clip:ViT-S-32"]["scores"]["leep"] is None  # no source classifier
    assert by_name["vit_tiny_patch16_224"]["scores"]["leep"] is not None
    assert all(row["encoded_images"] == 32 and row["images_per_second"] > 0 for row in selection["candidates"])
    assert "| 1 | " + selection["ranking"][0] in out and "n/a" in out
    best = selection["ranking"][0]
    results = [json.loads(p.read_text()) for p in (tmp_path / "logs").rglob("results.json")]
    assert [r["config"]["backbone_type"] for r in results] == [best]
    # the run reused the first task's training features that the selection encoded
    assert results[0]["timings"]["encoded_images"] == 10 * 8 + 10 * 4 - 32


def test_pilot_select_refuses_bad_requests(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_raw(tmp_path)))
    for args, message in ((["--candidates", "vit_tiny_patch16_224", "--tasks", "9"], "between 1 and the stream's 4"),
                          (["--candidates", "vit_tiny_patch16_224", "--rank-by", "best"], "--rank-by must be one of"),
                          (["--candidates", "vit_tiny_patch16_2244"], "Unknown backbone")):
        assert main(["select", "--config", str(path), *args]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
@requires_assets
def test_on_real_data_every_estimator_prefers_the_pretrained_deit_to_its_random_twin(tmp_path):
    from pilot.selection import select

    config = build_config(real_raw(tmp_path, train_per_class=20, test_per_class=10))
    selection = select(config, ["random:deit_tiny_patch16_224", "deit_tiny_patch16_224"], report=lambda _: None)
    assert selection["ranking"] == ["deit_tiny_patch16_224", "random:deit_tiny_patch16_224"]
    for name in ("logme", "ncm_accuracy", "leep"):
        assert selection["rankings"][name][0] == "deit_tiny_patch16_224", name
