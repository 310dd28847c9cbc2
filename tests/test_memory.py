"""Rehearsal memory: PILOT's budgets, reduce-then-herd order, herding, random draws, state files, config errors."""
import numpy as np
import pytest
import torch

from pilot.data.datasets import ImageSet
from pilot.data.stream import Split
from pilot.errors import PilotError
from pilot.memory import RehearsalMemory, check_memory_config, herding, normalise
from pilot.statefile import load_state, save_state

PER_CLASS_IMAGES = 12


def make_source(num_classes: int, per_class: int = PER_CLASS_IMAGES) -> ImageSet:
    """Images of class c at positions c, c + num_classes, ... (interleaved, as a shuffled dataset)."""
    labels = np.tile(np.arange(num_classes), per_class)
    return ImageSet(np.zeros((len(labels), 2, 2, 3), dtype=np.uint8), labels)


def task_split(source: ImageSet, classes: range) -> Split:
    indices = np.flatnonzero(np.isin(source.labels, list(classes)))
    return Split("train", source, indices, source.labels[indices])


def table_features(table: torch.Tensor):
    """A fixed "model": each source image's feature row (unnormalised, as a backbone gives)."""
    return lambda split: table[torch.from_numpy(split.indices)]


def run_tasks(memory: RehearsalMemory, source: ImageSet, tasks: list[range], features, seed: int = 0):
    """Learn ``tasks`` in turn; the memory's counts after each."""
    generator = torch.Generator().manual_seed(seed)
    history = []
    for classes in tasks:
        memory.update(task_split(source, classes), classes, features, classes.stop, generator)
        history.append(memory.counts())
    return history


TASKS = [range(0, 2), range(2, 4), range(4, 6)]


def test_budgets_follow_pilot_formulas_across_tasks():
    source = make_source(6)
    features = table_features(torch.randn(len(source), 8, generator=torch.Generator().manual_seed(1)))

    shared = RehearsalMemory(memory_size=20, memory_per_class=0, fixed_memory=False)
    history = run_tasks(shared, source, TASKS, features)
    expected = [20 // classes.stop for classes in TASKS]  # samples_per_class: memory_size // _total_classes
    assert expected == [10, 5, 3]
    assert [sorted(set(counts.values())) for counts in history] == [[m] for m in expected]
    assert [list(counts) for counts in history] == [list(range(c.stop)) for c in TASKS]
    assert [sum(counts.values()) for counts in history] == [20, 20, 18]
    assert shared.summary() == {"per_class": 3, "total": 18, "classes": 6}

    fixed = RehearsalMemory(memory_size=2000, memory_per_class=4, fixed_memory=True)
    history = run_tasks(fixed, source, TASKS, features)
    assert [sum(counts.values()) for counts in history] == [8, 16, 24]
    assert all(set(counts.values()) == {4} for counts in history)


def test_reduce_keeps_the_first_exemplars_of_each_old_class_in_stored_order():
    source = make_source(6)
    features = table_features(torch.randn(len(source), 8, generator=torch.Generator().manual_seed(2)))
    memory = RehearsalMemory(memory_size=20)
    memory.update(task_split(source, TASKS[0]), TASKS[0], features, 2)
    before = memory.split()
    memory.update(task_split(source, TASKS[1]), TASKS[1], features, 4)
    after = memory.split()
    for label in (0, 1):
        assert after.indices[after.labels == label].tolist() == before.indices[before.labels == label][:5].tolist()
    assert after.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5


def test_fixed_memory_leaves_old_classes_and_a_returning_class_alone():
    source = make_source(4)
    features = table_features(torch.randn(len(source), 8, generator=torch.Generator().manual_seed(3)))
    memory = RehearsalMemory(memory_per_class=3, fixed_memory=True)
    memory.update(task_split(source, range(0, 2)), range(0, 2), features, 2)
    first = memory.split().indices.tolist()
    # A domain stream brings class 1 again with class 2: class 1 keeps its exemplars, class 2 is herded.
    memory.update(task_split(source, range(1, 3)), range(1, 3), features, 3)
    assert memory.split().indices.tolist()[:6] == first
    assert memory.counts() == {0: 3, 1: 3, 2: 3}


# Six unit directions (rows scaled by arbitrary norms below; the memory normalises them):
#   p0 (1, 0)  p1 (.6, .8)  p2 (0, 1)  p3 (-.6, .8)  p4 (.8, -.6)  p5 (.28, .96)
# Class mean mu = (2.08, 2.96) / 6. For unit vectors ||k mu - S - p||^2 = const - 2 t.p with
# t = k mu - S (S = sum of picked), so step k picks the remaining p with the largest t.p:
#   k=1 t=mu=(.3467, .4933):    p0 .347  p1 .603  p2 .493  p3 .187  p4 -.019  p5 .571  -> p1
#   k=2 t=2mu-p1=(.0933, .1867): p0 .093  p2 .187  p3 .093  p4 -.037  p5 .205          -> p5
#   k=3 t=3mu-S=(.16, -.28):     p0 .16   p2 -.28  p3 -.32  p4 .296                    -> p4
#   k=4 t=(-.2933, .8133):       p0 -.293 p2 .813  p3 .827                             -> p3
#   k=5 t=(.6533, .5067):        p0 .653  p2 .507                                      -> p0
#   k=6                                                                                -> p2
HAND_POINTS = torch.tensor([[1, 0], [.6, .8], [0, 1], [-.6, .8], [.8, -.6], [.28, .96]], dtype=torch.float32)
HAND_ORDER = [1, 5, 4, 3, 0, 2]


def test_herding_matches_the_hand_computed_order():
    scaled = HAND_POINTS * torch.tensor([[2.0], [5.0], [0.5], [3.0], [1.0], [7.0]])
    assert herding(normalise(scaled), 6) == HAND_ORDER
    assert herding(normalise(scaled), 4) == HAND_ORDER[:4]

    source = ImageSet(np.zeros((6, 2, 2, 3), dtype=np.uint8), np.zeros(6, dtype=np.int64))
    split = Split("train", source, np.arange(6), np.zeros(6, dtype=np.int64))
    memory = RehearsalMemory(memory_per_class=4, fixed_memory=True)
    memory.update(split, [0], table_features(scaled), 1)
    assert memory.split().indices.tolist() == HAND_ORDER[:4]


def pilot_herding(vectors: np.ndarray, data: np.ndarray, m: int) -> list[int]:
    """models/base.py _construct_exemplar's selection loop, as written there."""
    vectors = (vectors.T / (np.linalg.norm(vectors.T, axis=0) + 1e-8)).T
    class_mean = np.mean(vectors, axis=0)
    selected, exemplar_vectors = [], []
    for k in range(1, m + 1):
        S = np.sum(exemplar_vectors, axis=0)
        mu_p = (vectors + S) / k
        i = np.argmin(np.sqrt(np.sum((class_mean - mu_p) ** 2, axis=1)))
        selected.append(int(data[i]))
        exemplar_vectors.append(np.array(vectors[i]))
        vectors = np.delete(vectors, i, axis=0)
        data = np.delete(data, i, axis=0)
    return selected


def test_herding_matches_pilots_loop_on_random_data():
    source = make_source(3, per_class=40)
    table = torch.randn(len(source), 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5
    memory = RehearsalMemory(memory_size=60)
    memory.update(task_split(source, range(3)), range(3), table_features(table), 3)
    chosen = memory.split()
    for label in range(3):
        data = np.flatnonzero(source.labels == label)
        expected = pilot_herding(table.numpy()[data], data, 20)
        assert chosen.indices[chosen.labels == label].tolist() == expected


def test_random_selection_is_deterministic_per_seed_and_within_budget():
    source = make_source(6)

    def draw(seed):
        memory = RehearsalMemory(memory_size=20, selection="random")
        run_tasks(memory, source, TASKS, None, seed)
        return memory.split()

    first, again, other = draw(5), draw(5), draw(6)
    assert first.indices.tolist() == again.indices.tolist()
    assert first.indices.tolist() != other.indices.tolist()
    assert len(set(first.indices.tolist())) == len(first) == 18
    assert (source.labels[first.indices] == first.labels).all()


def test_state_round_trips_through_a_state_file(tmp_path):
    source = make_source(6)
    features = table_features(torch.randn(len(source), 8, generator=torch.Generator().manual_seed(7)))
    memory = RehearsalMemory(memory_size=20)
    run_tasks(memory, source, TASKS[:2], features)
    save_state(tmp_path / "memory.safetensors", memory.state_dict(), "test/1")

    loaded = RehearsalMemory(memory_size=20)
    loaded.load_state_dict(load_state(tmp_path / "memory.safetensors", "test/1"), source)
    assert loaded.split().indices.tolist() == memory.split().indices.tolist()
    assert loaded.split().labels.tolist() == memory.split().labels.tolist()
    assert loaded.counts() == memory.counts() and loaded.summary() == memory.summary()
    for copy in (memory, loaded):  # resuming goes on exactly as the run that saved
        copy.update(task_split(source, TASKS[2]), TASKS[2], features, 6)
    assert loaded.split().indices.tolist() == memory.split().indices.tolist()


def test_disabled_memory_keeps_nothing():
    memory = RehearsalMemory()
    assert not memory.enabled
    memory.update(task_split(make_source(2), range(2)), range(2), None, 2)
    assert len(memory) == 0 and memory.counts() == {}


@pytest.mark.parametrize("keys, sizes, message", [
    ((-1, 0, False, "herding"), [2], "memory_size is -1; it must be 0 or more"),
    ((0, -3, True, "herding"), [2], "memory_per_class is -3; it must be 0 or more"),
    ((20, 0, False, "kmeans"), [2], "memory_selection is 'kmeans'; use 'herding'"),
    ((2000, 0, True, "herding"), [2], "fixed_memory is true, so each class keeps memory_per_class exemplars, but "
                                      "memory_per_class is 0"),
    ((0, 20, False, "herding"), [2], "fixed_memory is false, so the classes seen share memory_size, but memory_size "
                                     "is 0"),
    ((20, 0, False, "herding"), [10, 10, 10], "gives zero exemplars per class after task 3, when 30 classes are seen "
                                              "(20 // 30 = 0). Set memory_size to at least 30"),
])
def test_bad_memory_config_says_what_to_fix(keys, sizes, message):
    with pytest.raises(PilotError, match="Fix it in the JSON config") as error:
        check_memory_config(*keys, task_sizes=sizes)
    assert message in str(error.value)


def test_pilot_memory_configs_pass():
    check_memory_config(2000, 20, False, "herding", task_sizes=[10] * 10)  # CIFAR iCaRL
    check_memory_config(4000, 20, True, "herding", task_sizes=[20] * 10)  # ImageNet-R FOSTER
    check_memory_config(0, 0, False, "herding", task_sizes=[10] * 10)  # exemplar-free
    check_memory_config(20, 0, False, "herding", num_classes_total=20)
    with pytest.raises(PilotError, match="once 21 classes are seen"):
        check_memory_config(20, 0, False, "herding", num_classes_total=21)


def test_from_config_reads_pilots_keys_and_checks_the_stream():
    from dataclasses import replace

    from pilot.config import ExperimentConfig
    config = replace(ExperimentConfig(), memory_size=2000, memory_per_class=20, fixed_memory=False)
    memory = RehearsalMemory.from_config(config, [10] * 10)
    assert (memory.enabled, memory.per_class(30), memory.selection) == (True, 2000 // 30, "herding")
    with pytest.raises(PilotError, match="after task 2, when 20 classes"):
        RehearsalMemory.from_config(replace(config, memory_size=15), [10] * 10)
