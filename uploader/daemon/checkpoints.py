"""Which files form one checkpoint, which trainer wrote it, and when it is complete.

The one place for checkpoint rules (:mod:`uploader.daemon.layouts` decides which files
are uploaded at all and where they go).

**Which directory is one checkpoint.** Walking a file's path from the outermost
directory in, the first directory claimed by a rule is its checkpoint (so diffusers'
``checkpoint-4/unet/...`` and Megatron's ``iter_0000100/mp_rank_00/...`` are one
checkpoint each, and an HF Trainer's FSDP ``checkpoint-8/pytorch_model_fsdp_0/.metadata``
belongs to ``checkpoint-8``). At each depth the user's ``--checkpoint-dir`` rules come
first, then:

* DeepSpeed's ``global_stepN/`` (by name);
* Megatron-LM's ``iter_NNNNNNN/`` (by name: seven digits);
* a *numbered* directory (:data:`NUMBERED`: ``checkpoint-64``, ``checkpoint_4``,
  ``step_10``, ``step-10``, ``global_step100``, ``iter_0000100``, ``epoch_3``,
  ``epoch=3-step=100``): claimed by its name, before its first file is complete; which
  trainer wrote it, and so when it is complete, is read from its files
  (:meth:`Checkpoints.resolve`);
* torch DCP's ``.metadata``: a directory of any name holding it.

A directory without a number (``checkpoints/``, Lightning's ``dirpath``,
``lightning_logs/version_0``) is a folder: the checkpoint files in it
(:data:`CHECKPOINT_PATTERNS`) are single-file checkpoints, everything else artifacts.
A file inside a checkpoint directory is never a checkpoint of its own.

**When it is complete** (every rule also waits until every file in the directory is
verified, the version on disk being the one verified). Each trainer is recognised by
the files it writes, and its own last step decides:

========== ================================== =========================================
rule       recognised by                       complete when
========== ================================== =========================================
hf         ``trainer_state.json``,             ``trainer_state.json`` exists: Trainer.
           ``training_args.bin``,              _save_checkpoint writes the model (and
           ``rng_state*.pth``                  ``training_args.bin``), optimizer,
                                               scheduler, RNG state, then the state last
accelerate ``random_states_*.pkl``,            ``random_states_0.pkl`` exists: save_state
           ``optimizer*.bin``,                 writes models, optimizers, schedulers,
           ``scheduler*.bin``,                 samplers, scaler, then each process's
           ``sampler*.bin``,                   ``random_states_{i}.pkl``, then
           ``custom_checkpoint_*.pkl``         ``custom_checkpoint_{i}.pkl``; process 0
                                               writes its RNG file after every model and
                                               optimizer file, and files created right
                                               after it are seen while it settles
dcp        ``.metadata``, ``*.distcp``         ``.metadata`` exists (written last)
deepspeed  ``global_stepN/`` (name)            the ``latest`` tag beside it names it
megatron   ``iter_NNNNNNN/`` (name)            ``latest_checkpointed_iteration.txt``
                                               beside it names its iteration
settled    a numbered directory no rule        every file in it is closed by every
           recognises (but ``checkpoint-N``    writer, quiet for ``--settle`` and
           and ``checkpoint_N``, the HF        verified
           Trainer's, diffusers' and
           Accelerate's names, which wait for
           ``hf`` or ``accelerate``'s marker)
dir:GLOB   ``--checkpoint-dir GLOB=MARKER``    MARKER exists
settled:G  ``--checkpoint-dir settled:GLOB``   as ``settled``
========== ================================== =========================================

A ``settled`` checkpoint has no marker to trust: a trainer killed mid-save leaves
closed files, and a trainer that pauses longer than ``--settle`` between two files of
one save has the first ones committed alone (the full save is committed again once
its last file is verified). The pointer entry records the rule that committed it.

Example::

    rules = Checkpoints()
    unit = rules.unit(rank_root, "checkpoints/checkpoint_4/optimizer.bin")
    # Unit(name="checkpoints/checkpoint_4", rule="numbered", directory=True)
    rules.resolve(rank_root, unit).name        # "accelerate" once its files show it
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from uploader.errors import ConfigError

__all__ = [
    "CHECKPOINT_PATTERNS",
    "NUMBERED",
    "DEEPSPEED_TAG",
    "MEGATRON_TRACKER",
    "DirRule",
    "DEFAULT_DIR_RULES",
    "TRAINER_RULES",
    "parse_dir_rule",
    "Unit",
    "Checkpoints",
]

#: Single-file checkpoint names (outside any directory checkpoint): committed once
#: settled and verified. The torch side derives its file suffixes from these.
CHECKPOINT_PATTERNS: tuple[str, ...] = (
    "*.pt",
    "*.pt.gz",
    "*.pt.bz2",
    "*.pt.xz",
    "*.pt.zst",
    "*.tar",
    "*.tar.gz",
    "*.tgz",
    "*.tar.bz2",
    "*.tar.lzma",
    "*.ckpt",
    "*.pth",
    "*.safetensors",
    "*.bin",
)
_WORD = r"(?:checkpoint|ckpt|global_step|globalstep|step|iteration|iter|epoch|ep)"
#: A directory whose name carries a step or epoch number: one checkpoint.
NUMBERED = re.compile(rf"^{_WORD}[-_=]?\d+(?:[-_]{_WORD}[-_=]?\d+)*$", re.IGNORECASE)
#: The names the HF Trainer and diffusers' scripts (``checkpoint-N``) and Accelerate's
#: automatic naming (``checkpoint_N``) give a checkpoint: never committed as merely settled.
HF_NAME = re.compile(r"^checkpoint[-_]\d+$")
#: DeepSpeed's tag file: names the newest complete ``global_stepN`` directory.
DEEPSPEED_TAG = "latest"
#: Megatron-LM's tracker file: the newest complete iteration (``iter_{:07d}``).
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
#: Name of the claiming rule of numbered directories (resolved by their files).
NUMBERED_RULE = "numbered"
#: A marker that no file can have: the directory is complete once settled.
SETTLED = ""


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    base = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel if "/" in p else base, p) for p in patterns)


def _is_file(path: Path) -> bool:
    """A regular file (not a symlink) at ``path``."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_small(path: Path) -> str | None:
    """The text of a small regular file (a tag or tracker), or None."""
    if not _is_file(path):
        return None
    try:
        with open(path, "rb") as f:
            return f.read(256).decode(errors="replace").strip()
    except OSError:
        return None


@dataclass(frozen=True)
class DirRule:
    """A kind of directory checkpoint.

    Args:
        name: shown in the pointer (``rule``) and in logs: ``hf``, ``accelerate``,
            ``dcp``, ``deepspeed``, ``megatron``, ``settled``, ``dir:GLOB`` or
            ``settled:GLOB`` for a user rule; ``numbered`` claims numbered directories
            and is resolved by their files.
        glob: the directory's name (or its path inside the rank directory, when the
            glob holds a ``/``); empty for ``numbered`` (:data:`NUMBERED`).
        marker: the file whose presence makes the directory complete (for ``deepspeed``
            and ``megatron``: the tag or tracker file beside the directory; "" for a
            settled rule: complete once every file is verified).
        named: a directory matching ``glob`` is a checkpoint directory even before its
            marker exists (its files are never single-file checkpoints).
        signs: file names (globs, top level of the directory) that show this trainer
            wrote a numbered directory.
    """

    name: str
    glob: str
    marker: str
    named: bool = True
    signs: tuple[str, ...] = ()

    def matches(self, dirname: str) -> bool:
        if self.name == NUMBERED_RULE:
            return NUMBERED.match(dirname.rsplit("/", 1)[-1]) is not None
        return _matches(dirname, (self.glob,))

    @property
    def inside_marker(self) -> bool:
        """The marker is a file inside the directory, written last."""
        return bool(self.marker) and self.name not in ("deepspeed", "megatron")

    def waits_for(self) -> str:
        """What this rule waits for, in words (for the drain summary and ``status``)."""
        if self.name == "deepspeed":
            return f"the '{DEEPSPEED_TAG}' tag file does not name it yet"
        if self.name == "megatron":
            return f"{MEGATRON_TRACKER} does not name its iteration yet"
        if not self.marker:
            return "not every file is verified yet"
        return f"no {self.marker} yet (the save did not finish)"

    def complete(self, rank_root: Path, dirname: str) -> bool:
        """Whether the directory ``dirname`` (inside ``rank_root``) has its marker."""
        parent, _, base = dirname.rpartition("/")
        beside = rank_root / parent if parent else rank_root
        if self.name == "deepspeed":
            return _read_small(beside / DEEPSPEED_TAG) == base
        if self.name == "megatron":
            text = _read_small(beside / MEGATRON_TRACKER)
            digits = base.rpartition("_")[2]
            return (
                text is not None
                and text.isdigit()
                and digits.isdigit()
                and (int(text) == int(digits))
            )
        if not self.marker:
            return True
        return _is_file(rank_root / dirname / self.marker)


# The trainers' own rules, as Checkpoints.resolve tries them on a numbered directory's
# files (the first whose sign is there wins).
HF = DirRule(
    "hf",
    "",
    "trainer_state.json",
    signs=("trainer_state.json", "training_args.bin", "rng_state.pth", "rng_state_*.pth"),
)
ACCELERATE = DirRule(
    "accelerate",
    "",
    "random_states_0.pkl",
    signs=(
        "random_states_*.pkl",
        "optimizer.bin",
        "optimizer_*.bin",
        "scheduler.bin",
        "scheduler_*.bin",
        "sampler.bin",
        "sampler_*.bin",
        "dl_state_dict*.bin",
        "custom_checkpoint_*.pkl",
        "pytorch_model_fsdp_*",  # FSDP sharded state: a DCP directory per model
    ),
)
DCP = DirRule("dcp", "*", ".metadata", named=False, signs=(".metadata", "*.distcp"))
SETTLED_RULE = DirRule("settled", "", SETTLED)
#: Tried in this order on a numbered directory's files; none: :data:`SETTLED_RULE`.
TRAINER_RULES: tuple[DirRule, ...] = (HF, ACCELERATE, DCP)

DEFAULT_DIR_RULES: tuple[DirRule, ...] = (
    DirRule("deepspeed", "global_step*", DEEPSPEED_TAG),
    DirRule("megatron", "iter_[0-9][0-9][0-9][0-9][0-9][0-9][0-9]", MEGATRON_TRACKER),
    DirRule(NUMBERED_RULE, "", SETTLED),
    DCP,
)


def parse_dir_rule(text: str) -> DirRule:
    """A user rule from ``GLOB=MARKER`` or ``settled:GLOB`` (``--checkpoint-dir``);
    ConfigError when malformed."""
    if text.strip().startswith("settled:"):
        glob, marker = text.strip()[len("settled:") :].strip().strip("/"), SETTLED
        name = f"settled:{glob}"
        if not glob:
            raise ConfigError(
                f"--checkpoint-dir {text!r}: 'settled:' needs a GLOB, e.g. 'settled:run_*' "
                "makes every directory named run_* a checkpoint, complete once settled"
            )
    else:
        glob, sep, marker = text.partition("=")
        glob, marker = glob.strip().strip("/"), marker.strip()
        if not sep or not glob or not marker:
            raise ConfigError(
                f"--checkpoint-dir {text!r} is not GLOB=MARKER nor settled:GLOB; e.g. "
                "'step_*=COMMITTED' makes every directory named step_* a checkpoint, complete "
                "once it holds COMMITTED ('settled:step_*': once its files are settled)"
            )
        if "/" in marker or marker in (".", ".."):
            raise ConfigError(
                f"--checkpoint-dir {text!r}: MARKER must be a file name inside the directory, "
                f"not a path ({marker!r})"
            )
        name = f"dir:{glob}"
    if any(p in ("", ".", "..") for p in glob.split("/")):
        raise ConfigError(f"--checkpoint-dir {text!r}: GLOB must be a relative path pattern")
    return DirRule(name, glob, marker)


@dataclass(frozen=True)
class Unit:
    """The checkpoint a file belongs to: ``name`` (inside the rank directory) and the
    rule that claimed it (``file`` for a single-file checkpoint; ``numbered`` for a
    numbered directory, whose trainer's rule :meth:`Checkpoints.resolve` reads)."""

    name: str
    rule: str
    directory: bool


@dataclass(frozen=True)
class Checkpoints:
    """Which files form one checkpoint, and when a directory checkpoint is complete.

    Args:
        single: names of single-file checkpoints (outside any directory checkpoint).
        rules: directory rules, the user's first: at each depth, the first that claims
            the directory wins.
    """

    single: tuple[str, ...] = CHECKPOINT_PATTERNS
    rules: tuple[DirRule, ...] = DEFAULT_DIR_RULES

    def rule(self, name: str) -> DirRule | None:
        for r in (*self.rules, *TRAINER_RULES, SETTLED_RULE):
            if r.name == name:
                return r
        return None

    def unit(self, rank_root: Path, name: str) -> Unit | None:
        """The checkpoint the file ``name`` (inside ``rank_root``) belongs to, or None for
        an artifact. The outermost directory a rule claims wins (a named directory at
        once; DCP's once its ``.metadata`` exists)."""
        parts = name.split("/")
        for depth in range(1, len(parts)):
            dirname = "/".join(parts[:depth])
            for r in self.rules:
                if r.matches(dirname) and (r.named or r.complete(rank_root, dirname)):
                    return Unit(dirname, r.name, True)
        if _matches(name, self.single):
            return Unit(name, "file", False)
        return None

    def resolve(
        self, rank_root: Path, unit: Unit, names: Iterable[str] | None = None
    ) -> DirRule | None:
        """The rule that decides when the directory checkpoint ``unit`` is complete: the
        rule that claimed it, or for a numbered directory the rule of the trainer its
        files show (``names``: the names at its top level; listed here when None),
        ``settled`` when they show none."""
        if not unit.directory:
            return None
        r = self.rule(unit.rule)
        if r is None or r.name != NUMBERED_RULE:
            return r
        if names is None:
            try:
                names = os.listdir(rank_root / unit.name)
            except OSError:
                names = ()
        top = tuple(names)
        for trainer in TRAINER_RULES:
            if any(_matches(n, trainer.signs) for n in top):
                return trainer
        if HF_NAME.match(unit.name.rsplit("/", 1)[-1]):
            # The HF Trainer's, diffusers' and Accelerate's names: wait for one of their
            # markers (the model files they write first show neither trainer yet).
            return HF
        return SETTLED_RULE

    def complete(self, rank_root: Path, unit: Unit, rule: DirRule | None = None) -> bool:
        """A directory checkpoint's marker says it is complete (single files: always)."""
        if not unit.directory:
            return True
        r = rule or self.resolve(rank_root, unit)
        return r is not None and r.complete(rank_root, unit.name)

    @staticmethod
    def is_marker(rule: DirRule | None, unit: Unit, name: str) -> bool:
        """Whether ``name`` is the marker file inside the directory checkpoint ``unit``."""
        return rule is not None and rule.inside_marker and name == f"{unit.name}/{rule.marker}"
