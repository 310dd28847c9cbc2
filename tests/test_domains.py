"""Domain datasets: the folder and DomainNet layouts, synthetic domains, the domain order, bad inputs."""
from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from pilot.config import ExperimentConfig
from pilot.data.datasets import DATASETS, load_dataset
from pilot.data.domains import load_domain_folder, load_domainnet, make_synthetic_domains
from pilot.data.stream import domain_sequence
from pilot.errors import PilotError


def write_png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(path)


def write_domain_folders(root, layout):
    """``layout``: {domain: {part: {class folder: image count}}}."""
    for domain, parts in layout.items():
        for part, classes in parts.items():
            for class_folder, count in classes.items():
                (root / domain / part / class_folder).mkdir(parents=True, exist_ok=True)
                for index in range(count):
                    write_png(root / domain / part / class_folder / f"{index}.png", index)


TWO_DOMAINS = {
    "sketch": {"train": {"hot_dog": 2, "apple": 1}, "test": {"hot_dog": 1, "apple": 1}},
    "real": {"train": {"hot_dog": 1, "apple": 1}, "test": {"hot_dog": 1, "apple": 2}},
}


def error_of(load) -> str:
    """The message of the PilotError that ``load()`` raises."""
    with pytest.raises(PilotError) as err:
        load()
    return str(err.value)


def folder_experiment(root, dataset="domain_folder"):
    return ExperimentConfig(dataset=dataset, data_path=str(root))


# ------------------------------------------------------------------------------ domain_folder

def test_domain_folders_are_read_domain_by_domain(tmp_path):
    write_domain_folders(tmp_path, TWO_DOMAINS)
    data = load_dataset(folder_experiment(tmp_path))
    assert data.name == "domain_folder" and data.resize_to_model
    assert data.domain_names == ["real", "sketch"]
    assert data.class_names == ["apple", "hot dog"] and data.class_folders == ["apple", "hot_dog"]
    assert data.train.labels.tolist() == [0, 1, 0, 1, 1]
    assert data.train.domains.tolist() == [0, 0, 1, 1, 1]
    assert data.train.domains.dtype == np.int64 and data.train.labels.dtype == np.int64
    assert data.train.paths == [str(tmp_path / p) for p in (
        "real/train/apple/0.png", "real/train/hot_dog/0.png", "sketch/train/apple/0.png",
        "sketch/train/hot_dog/0.png", "sketch/train/hot_dog/1.png")]
    assert data.test.labels.tolist() == [0, 0, 1, 0, 1] and data.test.domains.tolist() == [0, 0, 0, 1, 1]
    assert data.manifest.origin == str(tmp_path.resolve())


def test_domain_folders_for_evaluation_need_only_test(tmp_path):
    write_domain_folders(tmp_path, {domain: {"test": parts["test"]} for domain, parts in TWO_DOMAINS.items()})
    data = load_domain_folder(str(tmp_path), parts=("test",))
    assert len(data.train) == 0 and data.train.domains.tolist() == []
    assert data.test.labels.tolist() == [0, 0, 1, 0, 1] and data.domain_names == ["real", "sketch"]


def test_domain_missing_a_train_class_is_named(tmp_path):
    write_domain_folders(tmp_path, {**TWO_DOMAINS, "sketch": {"train": {"hot_dog": 1}, "test": {"hot_dog": 1, "apple": 1}}})
    assert error_of(lambda: load_domain_folder(str(tmp_path))).startswith(
        f"Domain 'sketch' has no train images of class 'apple' (looked in '{tmp_path / 'sketch' / 'train'}'), "
        f"but domain 'sketch' has test images of it. Every domain must hold every class in train and test")


def test_class_in_train_but_not_test_is_named(tmp_path):
    write_domain_folders(tmp_path, {**TWO_DOMAINS, "real": {"train": {"hot_dog": 1, "apple": 1}, "test": {"apple": 1}}})
    with pytest.raises(PilotError, match="Domain 'real' has no test images of class 'hot_dog' .* but domain 'real' "
                                         "has train images of it"):
        load_domain_folder(str(tmp_path))


def test_empty_class_folder_counts_as_missing(tmp_path):
    empty_apple = {"train": {"hot_dog": 1, "apple": 0}, "test": {"hot_dog": 1, "apple": 1}}
    write_domain_folders(tmp_path, {**TWO_DOMAINS, "real": empty_apple})
    with pytest.raises(PilotError, match="Domain 'real' has no train images of class 'apple'"):
        load_domain_folder(str(tmp_path))


def test_domain_without_a_part_folder_is_named(tmp_path):
    write_domain_folders(tmp_path, {**TWO_DOMAINS, "real": {"train": {"hot_dog": 1, "apple": 1}}})
    with pytest.raises(PilotError, match=f"Domain folder '{tmp_path / 'real'}' has no 'test' folder"):
        load_domain_folder(str(tmp_path))


def test_data_path_without_domain_folders_says_what_is_expected(tmp_path):
    with pytest.raises(PilotError, match="Dataset 'domain_folder' not found: expected .* one folder per domain, each "
                                         "with <domain>/train/ and <domain>/test/"):
        load_domain_folder(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------- DomainNet

DOMAINNET_LISTS = {
    "clipart_train.txt": ["clipart/aircraft_carrier/clipart_001_000001.jpg 0", "clipart/zebra/clipart_345_000001.jpg 1",
                          "clipart/zebra/clipart_345_000002.jpg 1"],
    "clipart_test.txt": ["clipart/aircraft_carrier/clipart_001_000002.jpg 0", "clipart/zebra/clipart_345_000003.jpg 1"],
    "real_train.txt": ["real/aircraft_carrier/real_001_000001.jpg 0", "", "real/zebra/real_345_000001.jpg 1"],
    "real_test.txt": ["real/zebra/real_345_000002.jpg 1", "real/aircraft_carrier/real_001_000002.jpg 0"],
}


def write_domainnet(root, lists=DOMAINNET_LISTS, images=True):
    root.mkdir(parents=True, exist_ok=True)
    for name, lines in lists.items():
        (root / name).write_text("\n".join(lines) + "\n")
        for line in lines if images else []:
            if line:
                write_png(root / line.split()[0])
    return root


def test_domainnet_split_lists_are_read(tmp_path):
    root = write_domainnet(tmp_path / "domainnet")
    (root / "sketch" / "zebra").mkdir(parents=True)  # a domain folder without split lists: not a domain
    data = load_dataset(folder_experiment(tmp_path, "domainnet"))
    assert data.name == "domainnet" and data.resize_to_model
    assert data.domain_names == ["clipart", "real"]
    assert data.class_names == ["aircraft carrier", "zebra"] and data.class_folders == ["aircraft_carrier", "zebra"]
    assert data.train.paths == [str(root / p) for p in (
        "clipart/aircraft_carrier/clipart_001_000001.jpg", "clipart/zebra/clipart_345_000001.jpg",
        "clipart/zebra/clipart_345_000002.jpg", "real/aircraft_carrier/real_001_000001.jpg",
        "real/zebra/real_345_000001.jpg")]
    assert data.train.labels.tolist() == [0, 1, 1, 0, 1] and data.train.domains.tolist() == [0, 0, 0, 1, 1]
    assert data.test.labels.tolist() == [0, 1, 1, 0] and data.test.domains.tolist() == [0, 0, 1, 1]
    assert data.manifest.origin == str(root.resolve())


def test_domainnet_lists_directly_in_data_path_and_images_not_touched(tmp_path):
    write_domainnet(tmp_path, images=False)  # the files are checked later, by pilot.data.checks
    data = load_domainnet(str(tmp_path))
    assert data.train.paths[0] == str(tmp_path / "clipart/aircraft_carrier/clipart_001_000001.jpg")
    assert len(data.train) == 5 and len(data.test) == 4


def test_domainnet_for_evaluation_reads_only_test_lists(tmp_path):
    lists = {name: lines for name, lines in DOMAINNET_LISTS.items() if name.endswith("_test.txt")}
    data = load_domainnet(str(write_domainnet(tmp_path, lists, images=False)), parts=("test",))
    assert len(data.train) == 0 and data.test.labels.tolist() == [0, 1, 1, 0]
    full = load_domainnet(str(write_domainnet(tmp_path, images=False)))
    partial = load_domainnet(str(tmp_path), parts=("test",))
    assert len(partial.train) == 0  # its test images keep the feature cache rows of a full load's
    assert np.array_equal(partial.manifest.row_ids("test"), full.manifest.row_ids("test"))


@pytest.mark.parametrize("bad_line", ["clipart/zebra/clipart_1.jpg", "clipart/zebra/clipart_1.jpg one",
                                      "real/zebra/real_1.jpg 1", "zebra/clipart_1.jpg 1"])
def test_domainnet_line_that_does_not_parse_is_named(tmp_path, bad_line):
    lists = {**DOMAINNET_LISTS, "clipart_test.txt": DOMAINNET_LISTS["clipart_test.txt"] + [bad_line]}
    root = write_domainnet(tmp_path, lists, images=False)
    assert error_of(lambda: load_domainnet(str(root))).startswith(
        f"Line 3 of '{root / 'clipart_test.txt'}' does not parse: '{bad_line}'. Each line must read "
        f"'<domain>/<class folder>/<file> <label>' with domain 'clipart'")


def test_domainnet_domain_without_its_train_list_is_named(tmp_path):
    lists = {name: lines for name, lines in DOMAINNET_LISTS.items() if name != "real_train.txt"}
    root = write_domainnet(tmp_path, lists, images=False)
    assert error_of(lambda: load_domainnet(str(root))).startswith(
        f"DomainNet domain 'real' has no split list '{root / 'real_train.txt'}' (it has 'real_test.txt').")


def test_domainnet_label_with_two_class_folders_is_named(tmp_path):
    lists = {**DOMAINNET_LISTS, "real_test.txt": ["real/horse/real_345_000002.jpg 1", "real/aircraft_carrier/r.jpg 0"]}
    with pytest.raises(PilotError, match=r"Label 1 names two class folders: 'zebra' \(line 2 of 'clipart_train.txt'\) "
                                         r"and 'horse' \(line 1 of 'real_test.txt'\)"):
        load_domainnet(str(write_domainnet(tmp_path, lists, images=False)))


def test_domainnet_class_folder_with_two_labels_is_named(tmp_path):
    lists = {**DOMAINNET_LISTS, "real_test.txt": ["real/zebra/real_345_000002.jpg 2", "real/aircraft_carrier/r.jpg 0",
                                                  "real/zebra/real_345_000003.jpg 1"]}
    with pytest.raises(PilotError, match=r"Class folder 'zebra' has two labels, 1 \(line 2 of 'clipart_train.txt'\) "
                                         r"and 2 \(line 1 of 'real_test.txt'\)"):
        load_domainnet(str(write_domainnet(tmp_path, lists, images=False)))


def test_domainnet_domain_missing_a_test_class_is_named(tmp_path):
    lists = {**DOMAINNET_LISTS, "real_test.txt": ["real/zebra/real_345_000002.jpg 1"]}
    root = write_domainnet(tmp_path, lists, images=False)
    assert error_of(lambda: load_domainnet(str(root))).startswith(
        f"Domain 'real' has no test images of class 'aircraft_carrier' (looked in '{root / 'real_test.txt'}'), but "
        f"domain 'real' has train images of it.")


def test_domainnet_not_found_says_what_is_expected(tmp_path):
    (tmp_path / "clipart").mkdir()
    with pytest.raises(PilotError, match=r"DomainNet not found: no split list \('<domain>_train.txt', "
                                         r"'<domain>_test.txt'\) in .*domainnet' or "):
        load_domainnet(str(tmp_path))


# ---------------------------------------------------------------------------------- synthetic

def test_synthetic_domains_share_classes_and_differ_in_looks():
    data = make_synthetic_domains(num_classes=3, per_class=4, size=16, num_domains=2, seed=0)
    assert data.domain_names == ["domain_0", "domain_1"] and data.class_names == ["class_0", "class_1", "class_2"]
    assert data.train.images.shape == (24, 16, 16, 3) and data.test.images.shape == (12, 16, 16, 3)
    assert data.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [0] * 4 + [1] * 4 + [2] * 4
    assert data.train.domains.tolist() == [0] * 12 + [1] * 12
    assert data.test.labels.tolist() == [0, 0, 1, 1, 2, 2] * 2 and data.test.domains.tolist() == [0] * 6 + [1] * 6
    first, second = (data.train.images[data.train.domains == d].astype(float).mean(axis=0) for d in (0, 1))
    assert np.abs(first - second).mean() > 30  # the shift, far above what the noise leaves in a mean of 12


def test_synthetic_domains_are_deterministic():
    a, b = (make_synthetic_domains(4, 2, 8, 3, seed=5) for _ in range(2))
    assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.test.images, b.test.images)
    assert a.fingerprint == b.fingerprint != make_synthetic_domains(4, 2, 8, 3, seed=6).fingerprint
    assert not np.array_equal(a.train.images, make_synthetic_domains(4, 2, 8, 3, seed=6).train.images)


def test_synthetic_domains_are_learnable_within_each_domain():
    data = make_synthetic_domains(num_classes=5, per_class=8, size=16, num_domains=3)
    for domain in range(3):
        train, test = (part.domains == domain for part in (data.train, data.test))
        pixels = data.train.images[train].reshape(int(train.sum()), -1).astype(float)
        means = np.stack([pixels[data.train.labels[train] == c].mean(axis=0) for c in range(5)])
        queries = data.test.images[test].reshape(int(test.sum()), -1).astype(float)
        predicted = np.argmin(((queries[:, None] - means[None]) ** 2).sum(axis=2), axis=1)
        assert predicted.tolist() == data.test.labels[test].tolist()


def test_synthetic_domains_through_load_dataset():
    experiment = ExperimentConfig(dataset="synthetic_domains", synthetic_classes=3, synthetic_per_class=2,
                                  synthetic_image_size=8, synthetic_domains=4, data_path="")
    data = load_dataset(experiment)
    assert data.domain_names == [f"domain_{d}" for d in range(4)] and len(data.train) == 24
    assert {"domain_folder", "domainnet", "synthetic_domains"} <= set(DATASETS)


# ---------------------------------------------------------------------------- domain_sequence

DOMAINS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]


def test_domain_order_is_followed_by_name():
    assert domain_sequence(DOMAINS, ["real", "clipart", "sketch"], shuffle=True, seed=1993) == [4, 0, 5]


def test_without_an_order_domains_follow_pilots_shuffle():
    assert domain_sequence(DOMAINS, [], shuffle=True, seed=1993) == np.random.RandomState(1993).permutation(6).tolist()
    assert domain_sequence(DOMAINS, [], shuffle=True, seed=1) != domain_sequence(DOMAINS, [], shuffle=True, seed=2)
    assert domain_sequence(DOMAINS, [], shuffle=False, seed=1993) == [0, 1, 2, 3, 4, 5]


def test_unknown_domain_in_the_order_is_named_with_the_known_ones():
    assert error_of(lambda: domain_sequence(DOMAINS, ["real", "photo"], shuffle=True, seed=0)).startswith(
        "domain_order names 'photo', which is not a domain of this dataset. Known domains: 'clipart', 'infograph', "
        "'painting', 'quickdraw', 'real', 'sketch'.")


def test_repeated_domain_in_the_order_is_named():
    with pytest.raises(PilotError, match="domain_order names 'real' more than once"):
        domain_sequence(DOMAINS, ["real", "sketch", "real"], shuffle=True, seed=0)
