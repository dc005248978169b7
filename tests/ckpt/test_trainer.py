"""The Trainer's checkpoint arguments, what a checkpoint holds, and exact resume."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt
from ckpt.saver import CheckpointSaver, temp_name
from tests.ckpt.helpers import (
    assert_same_tensors,
    assert_same_training_state,
    files,
    make_trainer,
)

CODECS = [None, "gzip", "bzip2", "lzma", "zstd"]
EXT = {None: ".pt", "gzip": ".pt.gz", "bzip2": ".pt.bz2", "lzma": ".pt.xz", "zstd": ".pt.zst"}
MAGIC = {
    None: b"PK\x03\x04",
    "gzip": b"\x1f\x8b",
    "bzip2": b"BZh",
    "lzma": b"\xfd7zXZ\x00",
    "zstd": b"\x28\xb5\x2f\xfd",
}


@pytest.fixture(scope="module")
def reference() -> ckpt.Trainer:
    """Four uninterrupted epochs (5 batches each), no checkpoints."""
    t = make_trainer("4ep")
    t.fit()
    return t


# -- where checkpoints go ----------------------------------------------------------------


def test_relative_save_folder_goes_under_runs_timestamp_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    t = make_trainer("1ep", save_folder="checkpoints", save_interval="1ep")
    t.fit()
    folder = t.checkpoint_saver.checkpoint_folder  # type: ignore[union-attr]
    assert os.listdir(folder) == ["ep1.pt"]
    assert t.run_directory is not None
    assert folder == t.run_directory / "checkpoints"
    assert t.run_directory.name == "rank_0"
    assert t.run_directory.parent.parent == tmp_path / "runs"
    assert (t.rank, t.world_size) == (0, 1)
    assert (t.timer.epoch, t.timer.batch) == (1, 5)


def test_absolute_save_folder_is_used_as_is(tmp_path: Path) -> None:
    t = make_trainer("1ep", save_folder=str(tmp_path / "abs"), save_interval=1)
    t.fit()
    assert t.checkpoint_saver is not None
    assert t.checkpoint_saver.checkpoint_folder == tmp_path / "abs"
    assert t.run_directory == tmp_path / "abs"
    assert files(tmp_path / "abs") == ["ep1.pt"]


def test_no_save_folder_saves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    t = make_trainer("1ep", save_folder=None)
    t.fit()
    assert t.checkpoint_saver is None and t.run_directory is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["10", "ep", "1.5ep", "10 epochs", "3sp", "0ba", 0, -2, 1.5, True])
def test_bad_save_interval_lists_accepted_forms(tmp_path: Path, bad: Any) -> None:
    if bad == "10":  # a string of digits is an integer of epochs
        assert ckpt.parse_interval(bad) == ckpt.Interval(10, "ep")
        return
    with pytest.raises(ValueError, match=r"'<N>ep'.*'<N>ba'.*integer"):
        make_trainer("1ep", save_folder=str(tmp_path), save_interval=bad)


def test_interval_forms() -> None:
    assert ckpt.parse_interval("10ep") == ckpt.Interval(10, "ep")
    assert ckpt.parse_interval("500ba") == ckpt.Interval(500, "ba")
    assert ckpt.parse_interval(3) == ckpt.Interval(3, "ep")
    assert str(ckpt.parse_interval(" 7BA ")) == "7ba"


@pytest.mark.parametrize(
    ("duration", "interval", "expected"),
    [
        ("7ba", "3ba", ["ba3.pt", "ba6.pt", "ba7.pt"]),
        ("2ep", "5ep", ["ep2.pt"]),
        ("7ba", "1ep", ["ba7.pt", "ep1.pt"]),
        ("10ba", "1ep", ["ep1.pt", "ep2.pt"]),
    ],
)
def test_end_of_training_always_leaves_a_checkpoint(
    tmp_path: Path, duration: str, interval: str, expected: list[str]
) -> None:
    t = make_trainer(duration, save_folder=str(tmp_path), save_interval=interval)
    t.fit()
    assert files(tmp_path) == expected


# -- what a checkpoint holds ---------------------------------------------------------------


def test_checkpoint_holds_rng_and_state_and_loads_weights_only(tmp_path: Path) -> None:
    t = make_trainer("1ep", save_folder=str(tmp_path))
    t.fit()
    data = torch.load(tmp_path / "ep1.pt", weights_only=True)
    assert list(data) == ["rng", "state"]
    assert list(data["state"]) == [
        "model",
        "timer",
        "optimizers",
        "schedulers",
        "scaler",
        "algorithms",
        "callbacks",
        "rng",
        "rank_zero_seed",
        "is_model_ddp",
    ]
    st = data["state"]
    assert st["timer"] == {"epoch": 1, "batch": 5, "batch_in_epoch": 0, "sample": 40}
    assert st["rank_zero_seed"] == 17 and st["is_model_ddp"] is False
    assert_same_tensors(st["model"], dict(t.model.state_dict()))
    assert st["schedulers"][0]["last_epoch"] == 1
    # "To load them into a model outside of a Trainer, use torch.load"
    fresh = make_trainer("1ep").model
    fresh.load_state_dict(torch.load(tmp_path / "ep1.pt")["state"]["model"])
    assert_same_tensors(dict(fresh.state_dict()), dict(t.model.state_dict()))


@pytest.mark.parametrize("codec", CODECS)
def test_compressed_checkpoints_named_and_encoded(tmp_path: Path, codec: str | None) -> None:
    t = make_trainer("1ep", save_folder=str(tmp_path), save_compression=codec)
    t.fit()
    name = "ep1" + EXT[codec]
    assert files(tmp_path) == [name]
    assert (tmp_path / name).read_bytes().startswith(MAGIC[codec])
    fresh = make_trainer("1ep").model
    fresh.load_state_dict(ckpt.load(tmp_path / name)["state"]["model"])
    assert_same_tensors(dict(fresh.state_dict()), dict(t.model.state_dict()))


def test_unknown_compression_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="zstd"):
        make_trainer("1ep", save_folder=str(tmp_path), save_compression="snappy")


# -- exact resume ---------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    ("first", "interval", "resume_from"),
    [
        ("2ep", "1ep", "ep2"),  # an epoch checkpoint
        ("7ba", "3ba", "ba6"),  # mid-epoch: epoch 1, one batch in
    ],
)
def test_resume_is_bit_identical(
    tmp_path: Path,
    reference: ckpt.Trainer,
    codec: str | None,
    first: str,
    interval: str,
    resume_from: str,
) -> None:
    t1 = make_trainer(
        first, save_folder=str(tmp_path), save_interval=interval, save_compression=codec
    )
    t1.fit()
    path = tmp_path / (resume_from + EXT[codec])
    t2 = make_trainer("4ep", load_path_format=str(path))
    assert t2.timer.batch == int(resume_from[2:]) * (5 if resume_from.startswith("ep") else 1)
    t2.fit()
    assert_same_training_state(reference, t2)
    assert t2.schedulers[0].state_dict() == reference.schedulers[0].state_dict()


@pytest.mark.parametrize("resume_from", ["ba5", "ba7"])
def test_resume_synchronous_saves_at_epoch_edge_and_final(
    tmp_path: Path, reference: ckpt.Trainer, resume_from: str
) -> None:
    """ba5 is the last batch of epoch 0 (epoch end not yet run); ba7 is the end-of-training file."""
    t1 = make_trainer(
        "7ba", save_folder=str(tmp_path / "r0"), save_interval="5ba", save_async=False
    )
    t1.fit()
    assert files(tmp_path / "r0") == ["ba5.pt", "ba7.pt"]
    t2 = make_trainer("4ep", load_path_format=str(tmp_path / "r{rank}" / f"{resume_from}.pt"))
    t2.fit()
    assert_same_training_state(reference, t2)


def test_resume_twice_through_the_chain(tmp_path: Path, reference: ckpt.Trainer) -> None:
    make_trainer("1ep", save_folder=str(tmp_path / "a")).fit()
    t = make_trainer(
        "13ba",
        save_folder=str(tmp_path / "b"),
        save_interval="4ba",
        load_path_format=str(tmp_path / "a" / "ep1.pt"),
        save_compression="zstd",
    )
    t.fit()
    assert files(tmp_path / "b") == ["ba12.pt.zst", "ba13.pt.zst", "ba8.pt.zst"]
    t3 = make_trainer("4ep", load_path_format=str(tmp_path / "b" / "ba13.pt.zst"))
    t3.fit()
    assert_same_training_state(reference, t3)


# -- incompatible objects, weights only, strict --------------------------------------------


@pytest.fixture(scope="module")
def saved_ep1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ep1")
    make_trainer("1ep", save_folder=str(folder)).fit()
    return folder / "ep1.pt"


def test_new_objects_are_respected_on_resume(saved_ep1: Path) -> None:
    t = make_trainer("2ep", load_path_format=str(saved_ep1))
    saved = torch.load(saved_ep1, weights_only=True)["state"]
    assert_same_tensors(dict(t.model.state_dict()), saved["model"])
    assert t.timer.epoch == 1
    t.fit()
    assert t.timer.epoch == 2


def test_incompatible_model_shapes_are_named(saved_ep1: Path) -> None:
    with pytest.raises(
        ckpt.IncompatibleStateError, match=r"l1\.weight: checkpoint \(8, 4\) vs model \(16, 4\)"
    ):
        make_trainer("2ep", hidden=16, load_path_format=str(saved_ep1))


def test_missing_model_keys_are_named_on_resume(saved_ep1: Path) -> None:
    with pytest.raises(ckpt.IncompatibleStateError, match=r"missing in checkpoint: extra\.weight"):
        make_trainer("2ep", extra=True, load_path_format=str(saved_ep1))


def test_incompatible_optimizer_is_named(saved_ep1: Path) -> None:
    with pytest.raises(ckpt.IncompatibleStateError, match=r"SGD.*lacks hyperparameters.*momentum"):
        make_trainer("2ep", optimizer="sgd", load_path_format=str(saved_ep1))


def test_optimizer_state_shape_mismatch_is_named(tmp_path: Path, saved_ep1: Path) -> None:
    data = torch.load(saved_ep1, weights_only=True)
    data["state"]["optimizers"][0]["state"][0]["exp_avg"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.pt"
    torch.save(data, bad)
    with pytest.raises(ckpt.IncompatibleStateError, match=r"'exp_avg'.*\(3, 3\).*\(8, 4\)"):
        make_trainer("2ep", load_path_format=str(bad))


def test_weights_only_loads_only_the_model(saved_ep1: Path) -> None:
    t = make_trainer(
        "1ep", optimizer="sgd", load_path_format=str(saved_ep1), load_weights_only=True
    )
    saved = torch.load(saved_ep1, weights_only=True)["state"]
    assert_same_tensors(dict(t.model.state_dict()), saved["model"])
    assert t.timer.epoch == 0 and t.timer.batch == 0
    assert t.optimizers[0].state_dict()["state"] == {}
    t.fit()
    assert t.timer.epoch == 1


def test_weights_only_strict(saved_ep1: Path) -> None:
    with pytest.raises(ckpt.IncompatibleStateError, match=r"missing in checkpoint: extra\.weight"):
        make_trainer(
            "1ep",
            extra=True,
            load_path_format=str(saved_ep1),
            load_weights_only=True,
            load_strict=True,
        )
    t = make_trainer(
        "1ep",
        extra=True,
        load_path_format=str(saved_ep1),
        load_weights_only=True,
        load_strict=False,
    )
    saved = torch.load(saved_ep1, weights_only=True)["state"]["model"]
    assert torch.equal(t.model.state_dict()["l1.weight"], saved["l1.weight"])
    # shapes must match even when not strict
    with pytest.raises(ckpt.IncompatibleStateError, match="shape mismatch"):
        make_trainer("1ep", hidden=3, load_path_format=str(saved_ep1), load_weights_only=True)


# -- callbacks -----------------------------------------------------------------------------


class Recorder:
    """Duck-typed callback (not a ckpt.Callback subclass) with state."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.saved: list[Path] = []
        self.count = 0
        self.missing_at_fit_end: list[Path] = []

    def fit_start(self, trainer: Any) -> None:
        self.events.append("fit_start")

    def epoch_start(self, trainer: Any) -> None:
        self.events.append("epoch_start")

    def batch_end(self, trainer: Any) -> None:
        self.events.append("batch_end")
        self.count += 1

    def epoch_end(self, trainer: Any) -> None:
        self.events.append("epoch_end")

    def checkpoint_saved(self, trainer: Any, path: Path) -> None:
        assert threading.current_thread() is threading.main_thread()
        assert path.is_file() and path.stat().st_size > 0
        self.events.append(f"saved:{path.name}")
        self.saved.append(path)

    def fit_end(self, trainer: Any) -> None:
        self.events.append("fit_end")
        folder = trainer.checkpoint_saver.checkpoint_folder
        self.missing_at_fit_end = [p for p in self.saved if not p.exists()]
        assert {p.name for p in self.saved} == set(os.listdir(folder))

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.count = d["count"]


class Plain(ckpt.Callback):
    pass


def test_callback_events_and_state(tmp_path: Path) -> None:
    rec = Recorder()
    t = make_trainer(
        "2ep", save_folder=str(tmp_path), save_compression="zstd", callbacks=[rec, Plain()]
    )
    t.fit()
    ev = rec.events
    assert ev[0] == "fit_start" and ev[-1] == "fit_end"
    assert ev.count("epoch_start") == 2 and ev.count("epoch_end") == 2
    assert ev.count("batch_end") == 10
    assert [e for e in ev if e.startswith("saved:")] == ["saved:ep1.pt.zst", "saved:ep2.pt.zst"]
    # ep2 is reported after training, before fit_end
    assert ev.index("saved:ep2.pt.zst") == len(ev) - 2
    assert ev.index("saved:ep1.pt.zst") > ev.index("epoch_end")
    data = ckpt.load(tmp_path / "ep1.pt.zst")
    assert data["state"]["callbacks"] == {"Recorder": {"count": 5}}
    rec2 = Recorder()
    make_trainer("2ep", callbacks=[rec2], load_path_format=str(tmp_path / "ep1.pt.zst"))
    assert rec2.count == 5


# -- writing: async, atomic, failures --------------------------------------------------------


def test_background_failure_is_raised_at_the_next_event(tmp_path: Path) -> None:
    t = make_trainer("3ep", save_folder=str(tmp_path), callbacks=[Recorder()])
    # A directory where the temporary file must go makes the background write fail.
    temp_name(tmp_path / "ep1.pt").mkdir(parents=True)
    with pytest.raises(ckpt.CheckpointError, match="background failed.*free space"):
        t.fit()
    # raised at the first event after the failed write ended: in epoch 2 at the latest
    # (the save at the end of epoch 2 would wait for it), never after training went on
    assert t.timer.epoch in (1, 2) and t.timer.batch <= 10
    assert not (tmp_path / "ep1.pt").exists()


def test_async_snapshot_is_taken_before_save_returns(tmp_path: Path) -> None:
    saver = CheckpointSaver(tmp_path, "1ep", compression="lzma")
    w = torch.arange(1 << 20, dtype=torch.float32)
    saver.save({"w": w}, "ep1.pt.xz")
    w.zero_()  # training goes on and changes the weights
    assert saver.wait() == [tmp_path / "ep1.pt.xz"]
    assert torch.equal(
        ckpt.load(tmp_path / "ep1.pt.xz")["w"], torch.arange(1 << 20, dtype=torch.float32)
    )
    assert len(saver.blocked_seconds) == 1


def test_every_checkpoint_is_kept_when_saves_queue_up(tmp_path: Path) -> None:
    t = make_trainer(
        "10ba", save_folder=str(tmp_path), save_interval="1ba", save_compression="lzma"
    )
    t.fit()
    assert files(tmp_path) == sorted(f"ba{i}.pt.xz" for i in range(1, 11))


def test_watcher_never_sees_a_partial_file(tmp_path: Path) -> None:
    """Poll the folder while a slow write runs: only hidden .tmp names or complete files."""
    saver = CheckpointSaver(tmp_path, "1ep", compression="bzip2")
    obj = {"w": torch.randn(1 << 21)}
    saver.save(obj, "ep1.pt.bz2")
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while saver.in_flight and time.monotonic() < deadline:
        for name in os.listdir(tmp_path):
            seen.add(name)
            if not name.startswith("."):
                ckpt.load(tmp_path / name)  # complete whenever visible under its name
        time.sleep(0.002)
    saver.wait()
    assert ".ep1.pt.bz2.tmp" in seen
    assert all(n == "ep1.pt.bz2" or (n.startswith(".") and n.endswith(".tmp")) for n in seen)
    assert files(tmp_path) == ["ep1.pt.bz2"]


# -- the training loop's other styles --------------------------------------------------------


def test_loss_fn_style_default_optimizer_and_eval(tmp_path: Path) -> None:
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from tests.ckpt.helpers import dataset

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    before = model.weight.detach().clone()
    ds = dataset()
    t = ckpt.Trainer(
        model=model,
        train_dataloader=DataLoader(ds, batch_size=10),
        eval_dataloader=DataLoader(TensorDataset(ds.tensors[0], ds.tensors[1]), batch_size=20),
        loss_fn=lambda out, y: F.mse_loss(out.squeeze(-1), y),
        max_duration="8ba",
        save_folder=str(tmp_path),
        save_interval="4ba",
        seed=1,
    )
    assert isinstance(t.optimizers[0], torch.optim.SGD)
    t.fit()
    assert not torch.equal(before, model.weight)
    assert t.eval_loss is not None and t.eval_loss > 0
    assert files(tmp_path) == ["ba4.pt", "ba8.pt"]
    assert (t.timer.epoch, t.timer.batch) == (2, 8)
    with pytest.raises(TypeError, match="scalar loss"):
        ckpt.Trainer(
            model=torch.nn.Linear(4, 1), train_dataloader=[torch.ones(2, 4)], max_duration="1ba"
        ).fit()


def test_load_defaults_follow_the_seed() -> None:
    import inspect

    params = inspect.signature(ckpt.Trainer).parameters
    assert params["load_chunk_size"].default == 1_048_576 == ckpt.DEFAULT_CHUNK_SIZE
    assert params["load_progress_bar"].default is True
    assert params["load_weights_only"].default is False
    assert params["save_folder"].default is None
    assert params["save_async"].default is True


def test_empty_dataloader_is_an_error_not_an_endless_loop() -> None:
    t = ckpt.Trainer(model=torch.nn.Linear(4, 1), train_dataloader=[], max_duration="3ba")
    with pytest.raises(ValueError, match="no batches"):
        t.fit()


class PathState:
    """A callback whose state weights_only loading would refuse."""

    def state_dict(self) -> dict[str, Any]:
        return {"where": Path("/tmp")}


@pytest.mark.parametrize("save_async", [True, False])
def test_state_that_would_not_load_is_refused_at_save(tmp_path: Path, save_async: bool) -> None:
    t = make_trainer(
        "1ep", save_folder=str(tmp_path), callbacks=[PathState()], save_async=save_async
    )
    with pytest.raises(
        ckpt.CheckpointError, match=r"\['callbacks'\]\['PathState'\]\['where'\].*PosixPath"
    ):
        t.fit()
    assert files(tmp_path) == []


def test_state_dict_metadata_is_kept(tmp_path: Path) -> None:
    t = make_trainer("1ep", save_folder=str(tmp_path), save_compression="zstd")
    t.fit()
    model = ckpt.load(tmp_path / "ep1.pt.zst")["state"]["model"]
    assert model._metadata == t.model.state_dict()._metadata  # type: ignore[attr-defined]


def test_resume_with_worker_processes_is_bit_identical(tmp_path: Path) -> None:
    """Loader workers are seeded from the generators at the epoch start: the order replays."""
    kw = {"num_workers": 1, "multiprocessing_context": "fork"}
    ref = make_trainer("2ep", loader_kw=kw)
    ref.fit()
    make_trainer("7ba", loader_kw=kw, save_folder=str(tmp_path), save_interval="7ba").fit()
    t = make_trainer("2ep", loader_kw=kw, load_path_format=str(tmp_path / "ba7.pt"))
    t.fit()
    assert_same_training_state(ref, t)
