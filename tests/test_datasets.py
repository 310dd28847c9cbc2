import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pilot.config import ExperimentConfig
from pilot.data.datasets import load_cifar100, load_dataset, load_folder
from pilot.errors import PilotError


def write_cifar(folder, per_class=3, classes=4):
    """A miniature CIFAR-100 python release (same pickle keys and row layout)."""
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for part in ("train", "test"):
        labels = np.repeat(np.arange(classes), per_class).tolist()
        data = rng.randint(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        with open(folder / part, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "filenames": [], "batch_label": part}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(classes)]}, f)
    return folder


def test_reads_the_official_pickle_folder(tmp_path):
    write_cifar(tmp_path / "cifar-100-python")
    data = load_cifar100(str(tmp_path), download=False, name="cifar224")
    assert data.class_names == ["c0", "c1", "c2", "c3"]
    assert data.train.images.shape == (12, 32, 32, 3) and data.train.labels.tolist()[:4] == [0, 0, 0, 1]
    raw = pickle.load(open(tmp_path / "cifar-100-python" / "train", "rb"))["data"][0]
    # channel-major rows: the first 1024 values are the red plane
    assert np.array_equal(data.train.images[0, :, :, 0].ravel(), raw[:1024])
    assert data.resize_to_model and not load_cifar100(str(tmp_path), False, "cifar100").resize_to_model


def test_reads_the_tar_gz_without_extracting(tmp_path):
    folder = write_cifar(tmp_path / "src" / "cifar-100-python")
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
    data = load_cifar100(str(tmp_path), download=False, name="cifar224")
    assert len(data.test) == 12
    assert load_cifar100(str(archive), download=False, name="cifar224").num_classes == 4


def test_missing_cifar_says_where_it_looked(tmp_path):
    with pytest.raises(PilotError, match="CIFAR-100 not found: looked at") as err:
        load_cifar100(str(tmp_path / "nowhere"), download=False, name="cifar224")
    assert "cifar-100-python.tar.gz" in str(err.value) and "download" in str(err.value)


def test_a_failed_download_leaves_no_empty_folder_and_does_not_suggest_downloading(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(root, train, download):  # what torchvision does without internet: make the folder, then fail
        Path(root).mkdir(parents=True, exist_ok=True)
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(PilotError, match="downloading it failed") as err:
        load_cifar100(str(tmp_path / "data" / "cifar"), download=True, name="cifar224")
    assert '"download": true' not in str(err.value) and "data_path" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_pickle_is_a_clear_error(tmp_path):
    folder = write_cifar(tmp_path / "cifar-100-python")
    (folder / "train").write_bytes(b"\x80\x04 this is not a pickle")
    with pytest.raises(PilotError, match="corrupt or truncated"):
        load_cifar100(str(tmp_path), download=False, name="cifar224")


def write_folder_dataset(root, classes=("cat", "dog"), per_class=2):
    for part in ("train", "test"):
        for c in classes:
            (root / part / c).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), color=(i * 40, 0, 0)).save(root / part / c / f"{i}.png")


def test_pilot_folder_layout(tmp_path):
    write_folder_dataset(tmp_path / "imagenet-r")
    data = load_folder(str(tmp_path), "imagenetr")
    assert data.class_names == ["cat", "dog"] and data.train.labels.tolist() == [0, 0, 1, 1]
    assert data.train.load(0).size == (8, 8)
    write_folder_dataset(tmp_path / "generic")
    assert load_folder(str(tmp_path / "generic"), "folder").num_classes == 2


def test_missing_folder_dataset_says_what_to_do(tmp_path):
    with pytest.raises(PilotError, match=r"expected the folders .*cub.*train"):
        load_folder(str(tmp_path), "cub")


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(PilotError, match="Known datasets: .*cifar224"):
        load_dataset(ExperimentConfig(dataset="cifar1000"))
