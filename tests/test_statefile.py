"""State files: tensors in safetensors, the rest as JSON; the same tree comes back, and nothing runs."""
import math
import random

import numpy as np
import pytest
import torch

from pilot.engine import rng_state
from pilot.statefile import UnreadableState, load_state, save_state


def test_a_mixed_tree_comes_back_exactly(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    state = {
        "num_seen": 6, "lambda": 0.1 + 0.2, "name": "l2p", "none": None, "flag": True,
        "odd floats": [float("nan"), float("inf"), -float("inf"), 1e-310],
        "tuple": (3, (1, 2), "x"), "int keys": {0: "a", 7: [1]}, "$marked": {"$tensor": "not a tensor"},
        "view": base[:, 1], "again": base, "transposed": base.t(), "bool": torch.tensor([True, False]),
        "empty": torch.zeros(0, 5), "double": torch.tensor([1 / 3], dtype=torch.float64),
        "array": np.arange(6, dtype=np.uint32).reshape(2, 3), "numpy scalar": np.float32(2.5),
    }
    save_state(tmp_path / "s.safetensors", state, "test/1")
    loaded = load_state(tmp_path / "s.safetensors", "test/1")
    assert loaded.keys() == state.keys()
    for key in ("num_seen", "lambda", "name", "none", "flag", "tuple", "int keys", "$marked"):
        assert loaded[key] == state[key] and type(loaded[key]) is type(state[key]), key
    nan, inf, minus_inf, tiny = loaded["odd floats"]
    assert math.isnan(nan) and inf == math.inf and minus_inf == -math.inf and tiny == 1e-310
    for key in ("view", "again", "transposed", "bool", "empty", "double"):
        assert torch.equal(loaded[key], state[key]) and loaded[key].dtype == state[key].dtype, key
    assert loaded["array"].dtype == np.uint32 and (loaded["array"] == state["array"]).all()
    assert loaded["numpy scalar"] == 2.5


def test_rng_states_come_back_and_continue_the_same_draws(tmp_path):
    generator = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_state(tmp_path / "rng.safetensors", rng_state(generator), "test/1")
    expected = random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item()
    from pilot.engine import restore_rng_state

    restore_rng_state(load_state(tmp_path / "rng.safetensors", "test/1"), generator)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item()) == expected


def test_kinds_are_checked_and_unknown_types_refused(tmp_path):
    save_state(tmp_path / "a.safetensors", {"x": 1}, "pilot-features/1")
    with pytest.raises(UnreadableState, match="a pilot file of kind 'pilot-features/1', expected 'pilot-checkpoint/2'"):
        load_state(tmp_path / "a.safetensors", "pilot-checkpoint/2")
    with pytest.raises(TypeError, match="not set"):
        save_state(tmp_path / "b.safetensors", {"x": {1, 2}}, "test/1")
    assert not (tmp_path / "b.safetensors").exists()


def test_a_missing_or_foreign_file_is_named(tmp_path):
    with pytest.raises(UnreadableState, match="nowhere.safetensors' cannot be read"):
        load_state(tmp_path / "nowhere.safetensors", "test/1")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))  # safetensors, but no pilot state
    with pytest.raises(UnreadableState, match="model.safetensors' is not a pilot state file"):
        load_state(tmp_path / "model.safetensors", "test/1")


def test_a_flipped_byte_or_an_edited_tree_is_refused_as_damaged_or_edited(tmp_path):
    path = tmp_path / "s.safetensors"
    save_state(path, {"w": torch.arange(8.0), "n": 12345}, "test/1")
    intact = path.read_bytes()
    for old, new in ((intact[-1:], bytes([intact[-1] ^ 1])), (b"12345", b"12346")):
        at = intact.rindex(old)
        path.write_bytes(intact[:at] + new + intact[at + len(old):])
        with pytest.raises(UnreadableState, match="s.safetensors' was damaged or edited after pilot wrote it"):
            load_state(path, "test/1")


def test_a_file_without_a_digest_is_refused_as_of_an_earlier_version(tmp_path):
    from safetensors.torch import save_file

    save_file({"0": torch.ones(2)}, str(tmp_path / "old.safetensors"), metadata={"kind": "test/1", "tree": "{}"})
    with pytest.raises(UnreadableState, match="old.safetensors' has no digest .* an earlier pilot version wrote it"):
        load_state(tmp_path / "old.safetensors", "test/1")
