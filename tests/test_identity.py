"""One identity for a computation: changed data never resumes as if unchanged, and the feature cache
encodes again exactly the images that changed (tiny ViT on a small image folder)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pilot.configure import build_config
from pilot.engine import Run, run_experiment
from pilot.errors import PilotError
from pilot.statefile import load_state, save_state

from conftest import (Killed, assert_resume_matches_uninterrupted, clean_error, correct_result, die_at_task,
                      tiny_raw)

CLASSES = ("ant", "bee", "cat", "dog")  # seed 1's order: dog, cat (task 1), ant (task 2), bee (task 3)


def write_image(path: Path, index: int, seed: int) -> None:
    """An image of class colour ``index`` plus noise drawn from ``seed``."""
    colour = np.array([60 * index, 255 - 60 * index, 40 * (index % 2)], dtype=float)
    noise = np.random.RandomState(seed).normal(0, 20, (16, 16, 3))
    Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)).save(path)


def write_folder(root: Path) -> Path:
    """Each class 4 train and 2 test images."""
    for part, count in (("train", 4), ("test", 2)):
        for index, name in enumerate(CLASSES):
            (root / part / name).mkdir(parents=True)
            for i in range(count):
                write_image(root / part / name / f"{i}.png", index, seed=100 * count + 10 * index + i)
    return root


def folder_raw(tmp_path, root, **overrides):
    return tiny_raw(tmp_path, dataset="folder", data_path=str(root), init_cls=2, increment=1, **overrides)


def killed_after_task_1(raw) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Run, "_step", die_at_task(1))
        with pytest.raises(Killed):
            run_experiment(build_config(raw))


def add_image(root):
    write_image(root / "train" / "dog" / "9.png", 3, seed=99)


def delete_image(root):
    (root / "test" / "cat" / "1.png").unlink()


def rename_class(root):
    for part in ("train", "test"):
        (root / part / "cat").rename(root / part / "kitty")


def replace_image(root):
    write_image(root / "train" / "dog" / "0.png", 0, seed=7)


def add_class(root):
    for part in ("train", "test"):
        (root / part / "emu").mkdir()
        write_image(root / part / "emu" / "0.png", 5, seed=5)


@pytest.mark.parametrize("change, named", [
    (add_image, "1 file added to 'dog' (train)"),
    (delete_image, "1 file removed from 'cat' (test)"),
    (rename_class, "class 'cat' was renamed 'kitty'"),
    (replace_image, "1 file changed in 'dog' (train)"),
    (add_class, "class 'emu' was added"),  # not "another pilot version or edited": the real cause
])
@clean_error
def test_resume_on_data_changed_under_a_learnt_task_is_refused_naming_the_change(tmp_path, change, named):
    root = write_folder(tmp_path / "data")
    raw = folder_raw(tmp_path, root)
    killed_after_task_1(raw)
    change(root)
    with pytest.raises(PilotError, match="the data changed since its checkpoint after task 1") as refused:
        run_experiment(build_config(raw), resume=True)
    assert named in str(refused.value) and "--restart" in str(refused.value)
    (restarted,) = run_experiment(build_config(raw), restart=True)
    assert restarted["status"] == "complete"


def test_an_unchanged_dataset_resumes_to_the_uninterrupted_result(tmp_path):
    root = write_folder(tmp_path / "data")
    assert_resume_matches_uninterrupted(lambda folder: build_config(folder_raw(tmp_path / folder, root)))


@correct_result
def test_a_change_to_a_class_not_learnt_yet_resumes(tmp_path):
    root = write_folder(tmp_path / "data")
    raw = folder_raw(tmp_path, root)
    killed_after_task_1(raw)
    write_image(root / "train" / "bee" / "9.png", 1, seed=99)  # task 3's class
    (resumed,) = run_experiment(build_config(raw), resume=True)
    (fresh,) = run_experiment(build_config(folder_raw(tmp_path / "fresh", root)))
    assert resumed["counts"] == fresh["counts"]


@clean_error
def test_a_moved_exemplar_refuses_resume_with_a_rehearsal_memory(tmp_path):
    root = write_folder(tmp_path / "data")
    raw = folder_raw(tmp_path, root, model_name="replay", init_epoch=1, epochs=1, batch_size=8, memory_size=4,
                     init_milestones=[], milestones=[])
    killed_after_task_1(raw)
    write_image(root / "train" / "bee" / "9.png", 1, seed=99)  # not learnt, but before cat and dog in the folder order
    with pytest.raises(PilotError, match=r"1 file added to 'bee' \(train\), a class not learnt yet: it moves the "
                                         r"learnt training images, which the rehearsal memory keeps by position"):
        run_experiment(build_config(raw), resume=True)


@correct_result
def test_a_replaced_image_is_encoded_again_alone(tmp_path):
    root = write_folder(tmp_path / "data")
    cache = str(tmp_path / "cache")
    (first,) = run_experiment(build_config(folder_raw(tmp_path, root, feature_cache_dir=cache, prefix="a")))
    assert first["timings"]["encoded_images"] == 4 * 4 + 4 * 2
    replace_image(root)  # the same count of images: only its content (size, modification time) differs
    run = Run(build_config(folder_raw(tmp_path, root, feature_cache_dir=cache, prefix="b")))
    second = run.execute()
    assert second["timings"]["encoded_images"] == 1
    replaced = run.dataset.train.paths.index(str(root / "train" / "dog" / "0.png"))
    encode = run.ctx.features.encode
    task = next(t for t in run.stream.tasks if replaced in t.train.indices)
    run.ctx.access.open()
    assert torch.equal(run.ctx.features(task.train), encode(task.train))  # the cache holds the new image's features


@correct_result
def test_a_cache_file_of_another_width_is_encoded_again_with_a_warning(tmp_path):
    root = write_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    (first,) = run_experiment(build_config(folder_raw(tmp_path, root, feature_cache_dir=str(cache), prefix="a")))
    for path in cache.glob("features-*.safetensors"):
        saved = load_state(path, "pilot-features/1")
        save_state(path, {**saved, "rows": saved["rows"][:, :5].contiguous()}, "pilot-features/1")
    with pytest.warns(UserWarning, match=r"feature cache: .* holds (train|test) features of width 5, but the encoder "
                                         r"gives 192") as warned:
        (second,) = run_experiment(build_config(folder_raw(tmp_path, root, feature_cache_dir=str(cache), prefix="b")))
    assert len([w for w in warned if "width 5" in str(w.message)]) == 2
    assert second["counts"] == first["counts"]
    assert second["timings"]["encoded_images"] == first["timings"]["encoded_images"]


@clean_error
def test_the_manifest_names_what_changed_in_a_domain_folder(tmp_path):
    from pilot.data.domains import load_domain_folder
    from pilot.data.manifest import changes

    for domain in ("real", "sketch"):
        write_folder(tmp_path / domain)
    before = load_domain_folder(str(tmp_path))
    (tmp_path / "sketch").rename(tmp_path / "sketches")
    everything = {part: np.arange(len(getattr(before, part))) for part in ("train", "test")}
    assert changes(before.manifest, load_domain_folder(str(tmp_path)).manifest, everything, positions=False) == [
        "domain 'sketch' was renamed 'sketches'"]
    (tmp_path / "sketches").rename(tmp_path / "sketch")
    assert load_domain_folder(str(tmp_path)).fingerprint == before.fingerprint
    write_image(tmp_path / "real" / "test" / "bee" / "0.png", 1, seed=5)
    after = load_domain_folder(str(tmp_path))
    assert after.fingerprint != before.fingerprint
    assert changes(before.manifest, after.manifest, everything, positions=False) == [
        "1 file changed in 'bee' (test, domain 'real')"]
