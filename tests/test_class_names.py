"""Readable class names: CIFAR's meta names, folder names, WordNet ids, and the class_names override."""
import json
import pickle
import tarfile

import pytest
from PIL import Image

from pilot.data.datasets import load_cifar100, load_folder, make_synthetic
from pilot.data.names import apply_class_names, folder_class_name, imagenet_names
from pilot.errors import PilotError

from conftest import ASSETS, CIFAR_ARCHIVE


@pytest.mark.skipif(not CIFAR_ARCHIVE.is_file(), reason=f"CIFAR-100 archive not found at {CIFAR_ARCHIVE} (shared assets)")
def test_cifar_names_are_the_meta_names_with_spaces():
    with tarfile.open(CIFAR_ARCHIVE, "r:gz") as archive:
        meta = pickle.load(archive.extractfile("cifar-100-python/meta"), encoding="latin1")
    names = load_cifar100(str(ASSETS), download=False, name="cifar224").class_names
    assert names == [name.replace("_", " ") for name in meta["fine_label_names"]]
    assert names[:2] == ["apple", "aquarium fish"] and "maple tree" in names and len(names) == 100


def write_classes(root, folders):
    for part in ("train", "test"):
        for folder in folders:
            (root / part / folder).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(root / part / folder / "0.png")


def test_folder_names_become_words_and_wordnet_ids_english(tmp_path):
    folders = ["001.Black_footed_Albatross", "n01443537", "n01498041", "n99999999"]
    write_classes(tmp_path / "imagenet-r", folders)
    data = load_folder(str(tmp_path), "imagenetr")
    assert data.class_names == ["001.Black footed Albatross", "goldfish", "stingray", "n99999999"]
    assert data.class_folders == folders  # what the images were found by
    assert [data.train.paths[i].split("/")[-2] for i in range(4)] == folders


@pytest.mark.parametrize("folder, name", [
    ("n01443537", "goldfish"), ("n01484850", "great white shark"), ("n01694178", "African chameleon"),
    ("n02129165", "lion"), ("n07753592", "banana"), ("n04591713", "wine bottle"),
    ("n09999999", "n09999999"), ("great_grey_owl", "great grey owl"), ("n0144353", "n0144353"),
])
def test_folder_class_name(folder, name):
    assert folder_class_name(folder) == name


def test_the_table_names_every_imagenet_class_once():
    table = imagenet_names()
    assert len(table) == 1000 and len(set(table.values())) == 1000
    assert next(iter(table.items())) == ("n01440764", "tench")
    assert (table["n02012849"], table["n03126707"], table["n03710721"]) == ("crane bird", "construction crane", "tank suit")


def renamed(class_names):
    return apply_class_names(make_synthetic(3, 1, 4), class_names)


def test_override_by_list_and_by_json_file(tmp_path):
    assert renamed(["red", "green", "blue"]).class_names == ["red", "green", "blue"]
    path = tmp_path / "names.json"
    path.write_text(json.dumps(["a cat", "a dog", "a fox"]))
    data = renamed(str(path))
    assert data.class_names == ["a cat", "a dog", "a fox"] and data.num_classes == 3 and len(data.train) == 3
    assert renamed("").class_names == renamed([]).class_names == ["class_0", "class_1", "class_2"]


@pytest.mark.parametrize("class_names, message", [
    (["a", "b"], "class_names lists 2 names but synthetic has 3 classes. Set class_names to a list of one"),
    (["a", "b", "c", "d"], "class_names lists 4 names but synthetic has 3 classes"),
    (["a", "b", "a"], "class_names names 'a' twice (entries 0 and 2): each class needs its own name"),
    (["a", "", "c"], "class_names: entry 1 is '', not a non-empty string"),
    (["a", "  ", "c"], "class_names: entry 1 is '  ', not a non-empty string"),
    (["a", 7, "c"], "class_names: entry 1 is 7, not a non-empty string"),
])
def test_bad_override_list_says_what_is_wrong(class_names, message):
    with pytest.raises(PilotError) as err:
        renamed(class_names)
    assert message in str(err.value) and "in the dataset's own class order" in str(err.value)


def test_bad_override_file_says_what_is_wrong(tmp_path):
    path = tmp_path / "names.json"
    with pytest.raises(PilotError, match=r"class_names file '.*names.json' not found\. Set class_names to"):
        renamed(str(path))
    path.write_text('["a", "b",')
    with pytest.raises(PilotError, match=r"class_names file '.*names.json' cannot be read as JSON \(Expecting value"):
        renamed(str(path))
    path.write_text('{"0": "a"}')
    with pytest.raises(PilotError, match=r"class_names file '.*names.json' holds a dict, not a list of names"):
        renamed(str(path))
    path.write_text('["a", "b"]')
    with pytest.raises(PilotError, match=r"class_names file '.*names.json' lists 2 names but synthetic has 3 classes"):
        renamed(str(path))
