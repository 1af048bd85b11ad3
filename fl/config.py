"""The run configuration shared by ``simulate``, ``network init`` / ``up`` and the genesis.

One dataclass holds every run option, so the metrics file records the
complete configuration and every front end validates it the same way. Each
field is the option's one declaration: its name and type, its default and,
through :func:`option`, its help text, short flag, choices and check. From
these fields ``commands.options`` builds the click options, :meth:`RunConfig._problems`
runs the checks (plus the few that involve two fields), and the genesis's
``[run]`` table holds them all (``node.genesis``). A new run option is a
field here and the code that uses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any, Final

from fl.aggregation import AGGREGATIONS
from fl.attacks import ATTACKS
from fl.datasets import DATASETS
from fl.models import MODEL_NAMES
from fl.partition import DISTRIBUTIONS
from fl.privacy import ACCOUNTANTS, DEFAULT_REGISTRATION_SHARE, MECHANISMS, mechanism_of
from fl.validation import RULES

SELECTIONS: tuple[str, ...] = ("weighted", "paper", "random")
SERVER_LR_DECAYS: tuple[str, ...] = ("none", "cosine")
# Options whose default is the --dp mechanism's tuned value (``tuned`` of
# each mechanism in fl.privacy): unset, a run takes the mechanism's.
TUNED: tuple[str, ...] = (
    "batch_size",
    "lr",
    "momentum",
    "dropout",
    "server_momentum",
    "server_lr_decay",
    "dp_subspace",
)


# Declaring an option -----------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One option's check: ``ok(value)``, else ``message`` with ``{flag}`` (``--name``)
    and ``{value}`` filled in (``str.format``)."""

    ok: Callable[[Any], bool]
    message: str

    def problem(self, name: str, value: Any) -> str | None:
        return None if self.ok(value) else self.message.format(flag=flag(name), value=value)


def at_least(low: int) -> Check:
    return Check(lambda v: v >= low, f"{{flag}} must be >= {low}, got {{value}}")


def positive(*, finite: bool = False) -> Check:
    """``> 0`` (NaN fails); with ``finite``, infinity fails too."""
    if finite:
        return Check(lambda v: v > 0 and math.isfinite(v), "{flag} must be positive, got {value}")
    return Check(lambda v: v > 0, "{flag} must be positive, got {value}")


def within(interval: str) -> Check:
    """An interval written as the message shows it: ``"(0, 1]"``, ``"[0, 1)"`` ... (NaN fails)."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    low_open, high_open = interval[0] == "(", interval[-1] == ")"

    def ok(v: Any) -> bool:
        above = low < v if low_open else low <= v
        below = v < high if high_open else v <= high
        return above and below

    return Check(ok, f"{{flag}} must be in {interval}, got {{value}}")


def one_of(choices: Collection[str]) -> Check:
    listed = ", ".join(choices).replace("{", "{{").replace("}", "}}")
    return Check(lambda v: v in choices, f"{{flag}} must be one of {listed}, got {{value!r}}")


@dataclass(frozen=True)
class RunOption:
    """What the command line and the checks know of a run option besides its
    name, type and default (a field without :func:`option` gets these defaults)."""

    help: str | None = None
    short: str | None = None  # e.g. "-K"
    choices: tuple[str, ...] | None = None
    checks: tuple[Check, ...] = ()
    directory: bool = False  # a folder (the command line refuses a file)
    negatable: bool = True  # booleans: --name/--no-name; False: a plain --name flag


OPTION: Final = "run_option"


def option(
    default: Any,
    help: str | None = None,
    *,
    short: str | None = None,
    choices: Collection[str] | None = None,
    check: Check | None = None,
    directory: bool = False,
    negatable: bool = True,
) -> Any:
    """A :class:`RunConfig` field with its option's metadata. ``choices`` come with
    their check (:func:`one_of`) unless ``check`` replaces it."""
    checks = (check,) if check else (one_of(choices),) if choices else ()
    spec = RunOption(
        help=help,
        short=short,
        choices=tuple(choices) if choices else None,
        checks=checks,
        directory=directory,
        negatable=negatable,
    )
    return field(default=default, metadata={OPTION: spec})


def run_option(f: Field[Any]) -> RunOption:
    return f.metadata.get(OPTION, RunOption())


def flag(name: str) -> str:
    """The command-line spelling of field ``name``: ``--server-lr`` for ``server_lr``."""
    return "--" + name.replace("_", "-")


# The run options ---------------------------------------------------------

_KNOWN_DATASET = Check(
    lambda v: v in DATASETS,
    f"unknown dataset {{value!r}} (choices: {', '.join(DATASETS)})",
)


@dataclass(frozen=True)
class RunConfig:
    dataset: str = option("mnist", choices=DATASETS, check=_KNOWN_DATASET)
    data_dir: str | None = option(
        None,
        "MNIST root holding MNIST/raw/ [default: $LLBCFL_DATA, else ./data]",
        directory=True,
    )
    clients: int = option(100, "number of clients K", short="-K", check=at_least(1))
    frac: float = option(
        0.1, "fraction of clients selected per round", short="-C", check=within("(0, 1]")
    )
    rounds: int = option(50, short="-T", check=at_least(1))
    dist: str = option(
        "iid",
        "data partition: iid, noniid (2 label shards per client), dirichlet",
        choices=DISTRIBUTIONS,
    )
    alpha: float = option(0.5, "Dirichlet concentration for --dist dirichlet", check=positive())
    model: str = option("cnn", choices=MODEL_NAMES)
    local_epochs: float = option(
        1.0,
        "local epochs per round (fractions train on part of an epoch)",
        short="-E",
        check=positive(finite=True),
    )
    # The optimiser options below default to the --dp mechanism's tuned
    # values (``TUNED``), resolved in __post_init__.
    batch_size: int = option(None, "local batch size", short="-B", check=at_least(1))
    lr: float = option(None, "client learning rate", check=positive())
    momentum: float = option(None, "client SGD momentum", check=within("[0, 1)"))
    dropout: bool = option(
        None,
        "the CNN's dropout during local training (off helps DP-SGD: the noise already regularises)",
    )
    seed: int = option(0)
    aggregation: str = option("fedavg", choices=AGGREGATIONS)
    server_momentum: float = option(
        None, "server momentum b of FedAvgM (0: plain FedAvg)", check=within("[0, 1)")
    )
    server_lr: float = option(
        1.0, "server step size applied to the aggregate (FedAvgM)", check=positive()
    )
    server_lr_decay: str = option(
        None,
        "schedule of the server step: none, or cosine from --server-lr down to a tenth of it "
        "in the last round",
        choices=SERVER_LR_DECAYS,
    )
    selection: str = option(
        "weighted",
        "weighted: reputation gate then score-weighted draw; paper: top-N; random: uniform "
        "(the FedAvg control)",
        choices=SELECTIONS,
    )
    # Local differential privacy (docs/PRIVACY.md).
    dp: str = option(
        "none", "local DP mechanism applied on each client during training", choices=MECHANISMS
    )
    # Checked only under DP (in _problems).
    epsilon: float = option(10.0, "each client's total privacy budget over the run")
    delta: float = option(1e-5, "DP delta (gaussian only)", check=within("(0, 1)"))
    clip: float = option(
        1.0,
        "per-sample gradient norm bound (L2 for gaussian, L1 for laplace)",
        check=positive(),
    )
    dp_participations: int | None = option(
        None,
        "rounds a client may join; noise is calibrated for this many "
        "[default: 1.1 x rounds x frac]",
        check=at_least(1),
    )
    dp_subspace: int = option(
        None,
        "clip and noise per-sample gradients in a random public subspace of this dimension "
        "(0: full parameter space); makes --dp laplace usable",
        check=at_least(0),
    )
    dp_augmentations: int = option(
        1,
        "average each record's gradient over this many copies (itself and random shifts of "
        "up to 2 pixels) before clipping; same privacy, less noisy gradient",
        check=at_least(1),
    )
    # Accountant for the Gaussian mechanism: rdp, prv, or auto (the tighter).
    dp_accountant: str = option(
        "auto",
        "Gaussian accounting: rdp (Renyi DP), prv (privacy loss random variables), or auto: "
        "calibrate with both and keep the one that needs less noise",
        choices=ACCOUNTANTS,
    )
    dp_registration_share: float = option(
        DEFAULT_REGISTRATION_SHARE,
        "share of epsilon spent on the registration's noisy label histogram",
        check=within("(0, 1)"),
    )
    # Noise from a seeded generator: no privacy at all (tests, equivalence
    # checks and testbeds only; a node refuses it outside a testbed genesis).
    reproducible_noise: bool = option(
        False,
        "draw DP noise from the run seed instead of the OS's secret generator: anyone with "
        "the seed can remove it, so there is NO privacy (tests and equivalence checks only)",
        negatable=False,
    )
    # Trust: validation, reputation, selection.
    validation: bool = option(True, "miners' checks and Algorithm 2 (off: accept every update)")
    val_rule: str = option(
        "relative",
        "relative: reject below round median - k*MAD; absolute: the paper's threshold",
        choices=RULES,
    )
    val_k: float = option(3.0, "MAD multiplier of the relative rule")
    val_threshold: float = option(0.5, "minimum validation accuracy of the absolute rule")
    norm_bound: float | None = option(
        None, "reject updates whose L2 norm exceeds this [default: no absolute bound]"
    )
    val_norm_spread: bool = option(
        False,
        "relative rule: also reject norms above the round median + k*MAD (for IID DP runs "
        "under attack; on non-IID data it rejects honest clients)",
    )
    val_cosine_spread: bool = option(
        False,
        "relative rule: also reject updates whose cosine with the round's other updates is "
        "below the median - k*MAD (for IID DP runs under attack)",
    )
    val_reference_cosine: bool = option(
        False,
        "relative rule: also reject updates whose cosine with the validation set's clipped "
        "descent direction (at --clip) is below the round median - k*MAD (for IID runs under "
        "attack; colluding attackers cannot move this reference)",
    )
    reputation: bool = option(True, "subjective-logic reputation in selection")
    rep_threshold: float = option(
        0.4,
        "reputation a client needs to be eligible (weighted selection)",
        check=within("[0, 1]"),
    )
    freshness: float = option(0.9, "per-round decay z of old evidence", check=within("(0, 1]"))
    # Attacks for the robustness experiments.
    malicious: float = option(0.0, "fraction of clients that attack", check=within("[0, 1)"))
    attack: str = option("labelflip", "what malicious clients do", choices=ATTACKS)
    val_size: int = option(1_000, "test images held by the miners for validation")
    test_size: int = option(9_000, "test images used to report accuracy")
    train_size: int = option(60_000, "training images shared among the clients")
    # Intra-op threads per process; results are bit-identical only for equal counts.
    threads: int = option(
        1,
        "torch threads per process (results are identical only for equal counts)",
        check=at_least(1),
    )
    # The record cap (docs/ARCHITECTURE.md, "Admission"): no registration may
    # claim more, so no client's FedAvg weight or DP-SGD divisor exceeds it.
    max_records: int | None = option(
        None,
        "largest record count a registration may claim (its FedAvg weight) "
        "[default: 4 x the equal share train_size / clients]",
        check=at_least(1),
    )

    def __post_init__(self) -> None:
        if self.dp in MECHANISMS:  # else _problems reports the unknown name
            tuned = mechanism_of(self.dp).tuned_options(self.epsilon)
            for name in TUNED:
                if getattr(self, name) is None:
                    object.__setattr__(self, name, tuned[name])
        problems = list(self._problems())
        if problems:
            raise ValueError("; ".join(problems))

    def _problems(self) -> Iterator[str]:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:  # an optional option left unset
                continue
            for check in run_option(f).checks:
                problem = check.problem(f.name, value)
                if problem is not None:
                    yield problem
        # The checks that involve two options.
        if self.dp != "none" and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            yield f"--epsilon must be a positive number, got {self.epsilon}"
        if self.dp_augmentations > 1 and self.dp == "none":
            yield "--dp-augmentations needs --dp gaussian or laplace (it shapes DP-SGD's gradients)"
        if self.clients > self.train_size:
            yield f"--clients ({self.clients}) exceeds the training samples ({self.train_size})"

    @property
    def clients_per_round(self) -> int:
        return max(1, round(self.frac * self.clients))

    @property
    def expected_records(self) -> int:
        """A client's equal share of the training set: the public figure DP plans use."""
        return max(1, self.train_size // self.clients)

    @property
    def participations_budget(self) -> int:
        """Rounds a client may join: as set, else the expected count plus 10% slack."""
        if self.dp_participations is not None:
            return self.dp_participations
        expected = self.rounds * self.clients_per_round / self.clients
        return max(1, math.ceil(1.1 * expected))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})
