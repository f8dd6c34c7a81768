"""`ClipGroups`: a threshold per group of variables, each group clipped by its own synchronized norm.

With the synchronized gradients g_i (in the units of the global norm), groups
G_1 .. G_K and the default group G_0 of the variables no group claims:

    n_k   = sqrt(sum_{i in G_k} ||g_i||_2^2)        each group's norm
    s_k   = min(1, c_k / n_k)                        c_k: the group's threshold
    norm  = sqrt(sum_k (s_k n_k)^2)                  the global norm after the groups' clip
    scale = min(1, clip_norm / norm)                 clip_norm: `global_clip_norm` (1 without one)
    g_i  <- g_i * s_k(i) * scale

which is `tf.clip_by_global_norm` applied to each group's gradients, then to
all of them. The norms are those the one packed all-reduce already brought
(each gradient's squared norm), so the groups add no collective.
"""
from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Any, Dict, List, Sequence, Union

import keras
import tensorflow as tf

from distclip._src.checks import short_repr
from distclip._src.errors import ArgumentError
from distclip._src.norm import norm_from_squares
from distclip._src.policies import Policy
from distclip._src.threshold import ClipNorm, check_clip_norm, resolve_clip_norm
from distclip._src.variables import tf_variable, variable_path

#: The name of the group of the variables that no `VariableGroup` claims.
DEFAULT = "default"


@dataclasses.dataclass(frozen=True, eq=False)
class VariableGroup:
    """Variables clipped together by their own norm (one of `distclip.ClipGroups`' groups).

    Args:
      name: the group's name in results, logs and errors (not "default", which names the rest).
      clip_norm: the group's threshold, in units of the global norm: a positive number, a scalar tensor or
        variable, a callable of the step (a Keras `LearningRateSchedule`), or None (not clipped on its own).
      variables: the group's variables, or their paths (`variable.path`, such as "dense/kernel").
      patterns: regular expressions; a variable whose whole path matches one (`re.fullmatch`, as Keras's
        `MultiOptimizer` matches its `OptimizerMap`) is in the group.

    Raises:
      ArgumentError: a bad name, threshold or pattern, or neither `variables` nor `patterns`, named.
    """

    name: str
    clip_norm: ClipNorm
    variables: Sequence[Any] = ()
    patterns: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name == DEFAULT:
            raise ArgumentError(f"VariableGroup name must be a non-empty string other than {DEFAULT!r} (the "
                                f"variables no group claims); got name={short_repr(self.name)}")
        if isinstance(self.clip_norm, Policy):
            raise ArgumentError(f"VariableGroup {self.name!r}: clip_norm={self.clip_norm!r} is a policy; a group "
                                "takes a number, tensor, schedule or None (a policy may be ClipGroups' "
                                "global_clip_norm)")
        check_clip_norm(self.clip_norm)
        for field in ("variables", "patterns"):
            value = getattr(self, field)
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise ArgumentError(f"VariableGroup {self.name!r}: {field} must be a list or tuple; got "
                                    f"{field}={short_repr(value)}")
            object.__setattr__(self, field, tuple(value))
        for pattern in self.patterns:
            if not isinstance(pattern, str):
                raise ArgumentError(f"VariableGroup {self.name!r}: patterns must be strings; got {short_repr(pattern)}")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ArgumentError(f"VariableGroup {self.name!r}: patterns holds {pattern!r}, not a regular "
                                    f"expression ({e})") from None
        if not self.variables and not self.patterns:
            raise ArgumentError(f"VariableGroup {self.name!r} has no variables and no patterns: give one or both")

    def claims(self, variable: Any) -> bool:
        """Whether `variable` is in this group: listed (as itself or by its path), or its path matches a pattern.

        Args:
          variable: a Keras or TensorFlow variable.

        Returns:
          True if the group claims it.
        """
        path = variable_path(variable)
        return (any(_same(variable, v) for v in self.variables)
                or any(re.fullmatch(p, path) for p in self.patterns))

    def __repr__(self) -> str:
        paths = [v if isinstance(v, str) else variable_path(v) for v in self.variables]
        return (f"VariableGroup({self.name!r}, clip_norm={self.clip_norm!r}, variables={paths!r}, "
                f"patterns={list(self.patterns)!r})")


@keras.saving.register_keras_serializable(package="distclip")
@dataclasses.dataclass(frozen=True, eq=False)
class ClipGroups:
    """A threshold per group of variables: pass as `clip_norm=` to `ClipStep` or `ClipOptimizer`.

    Each group is clipped by its own synchronized norm, the variables no group
    claims by theirs at `default`, then everything by the global norm of what
    is left at `global_clip_norm` (see `distclip._src.groups` for the math):
    `tf.clip_by_global_norm` per group, then over all, on the global batch.

        distclip.ClipGroups([distclip.VariableGroup("embedding", 0.5, patterns=[r"embedding/.*"]),
                             distclip.VariableGroup("head", 2.0, variables=model.layers[-1].trainable_variables)],
                            default=1.0, global_clip_norm=1.5)

    `ClipResult.global_norm` is then the norm after the groups' clip (what
    `global_clip_norm`, and a spike detector, see); `group_norms` and
    `group_scales` give each group's norm before its clip and its factor, in
    the order of `names` (the default group last).

    Args:
      groups: the `distclip.VariableGroup`s, with distinct names; a variable may be in one group only.
      default: the threshold of the variables no group claims (anything a group's `clip_norm` may be).
      global_clip_norm: the threshold applied on top, to the norm after the groups' clip: anything
        `ClipStep`'s `clip_norm` takes, a policy (`distclip.AutoClip`, ...) included; None: none.

    Raises:
      ArgumentError: a bad argument, named with its value.
    """

    groups: Sequence[VariableGroup]
    default: ClipNorm
    global_clip_norm: Union[ClipNorm, Policy] = None

    def __post_init__(self) -> None:
        if not isinstance(self.groups, (list, tuple)) or not self.groups or \
                not all(isinstance(g, VariableGroup) for g in self.groups):
            raise ArgumentError(f"groups must be a non-empty list of distclip.VariableGroup; got "
                                f"groups={short_repr(self.groups)}")
        object.__setattr__(self, "groups", tuple(self.groups))
        names = [g.name for g in self.groups]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ArgumentError(f"groups must have distinct names; got {repeated[0]!r} more than once")
        if isinstance(self.default, Policy):
            raise ArgumentError(f"default={self.default!r} is a policy; the default group takes a number, tensor, "
                                "schedule or None (a policy may be global_clip_norm)")
        check_clip_norm(self.default)
        if not isinstance(self.global_clip_norm, Policy):
            check_clip_norm(self.global_clip_norm)

    @property
    def names(self) -> List[str]:
        """The groups' names, in order, then "default"."""
        return [g.name for g in self.groups] + [DEFAULT]

    def members(self, variables: Sequence[Any]) -> List[int]:
        """Each variable's group: its index in `names` (the default group is the last).

        Args:
          variables: the variables the step updates, in the order of `apply`.

        Returns:
          One index per variable.

        Raises:
          ArgumentError: a variable two groups claim, a group that claims none of `variables`, or a listed
            variable (or path) that is not among them; each named.
        """
        paths = [variable_path(v) for v in variables]
        out = []
        for v, path in zip(variables, paths, strict=True):
            claiming = [k for k, g in enumerate(self.groups) if g.claims(v)]
            if len(claiming) > 1:
                raise ArgumentError(f"the variable {path} is in two groups, {self.groups[claiming[0]].name!r} and "
                                    f"{self.groups[claiming[1]].name!r}: put it in one")
            out.append(claiming[0] if claiming else len(self.groups))
        for k, g in enumerate(self.groups):
            missing = [v for v in g.variables if not any(_same(v, w) for w in variables)]
            if missing:
                shown = missing[0] if isinstance(missing[0], str) else variable_path(missing[0])
                raise ArgumentError(f"VariableGroup {g.name!r} lists {shown}, which is not among the variables "
                                    f"updated ({_few(paths)})")
            if k not in out:
                raise ArgumentError(f"VariableGroup {g.name!r} claims none of the variables updated "
                                    f"({_few(paths)}); its patterns {list(g.patterns)!r} match whole paths")
        return out

    def thresholds(self, step: Any) -> tf.Tensor:
        """The groups' thresholds for this step (each checked as a `clip_norm` is).

        Args:
          step: the optimizer's iteration count, for thresholds that are schedules.

        Returns:
          float32 `[len(names)]`, in the order of `names` (inf for a group with None).

        Raises:
          ArgumentError: a threshold that is not a positive finite number (eagerly; in a graph, an assertion).
        """
        return tf.stack([resolve_clip_norm(c, step) for c in [g.clip_norm for g in self.groups] + [self.default]])

    def get_config(self) -> Dict[str, Any]:
        """What `from_config` rebuilds these groups from (Keras serialization; listed variables by path).

        Returns:
          The groups, `default` and `global_clip_norm`, thresholds serialized as `ClipOptimizer` saves its own.

        Raises:
          NotImplementedError: a threshold that cannot be saved (a tensor or variable).
        """
        return {"groups": [{"name": g.name, "clip_norm": serialize_clip_norm(g.clip_norm),
                            "variables": [v if isinstance(v, str) else variable_path(v) for v in g.variables],
                            "patterns": list(g.patterns)} for g in self.groups],
                "default": serialize_clip_norm(self.default),
                "global_clip_norm": serialize_clip_norm(self.global_clip_norm)}

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "ClipGroups":
        """Rebuilds `ClipGroups` from `get_config`'s output.

        Args:
          config: what `get_config` returned.

        Returns:
          The groups (listed variables as their paths).
        """
        groups = [VariableGroup(g["name"], deserialize_clip_norm(g["clip_norm"]), variables=g["variables"],
                                patterns=g["patterns"]) for g in config["groups"]]
        return cls(groups, deserialize_clip_norm(config["default"]),
                   deserialize_clip_norm(config["global_clip_norm"]))

    def __repr__(self) -> str:
        return (f"ClipGroups({list(self.groups)!r}, default={self.default!r}, "
                f"global_clip_norm={self.global_clip_norm!r})")


def measure_groups(squares: Sequence[tf.Tensor], grads: Sequence[Any], members: Sequence[int], count: int,
                to_mean: Any, rescale: bool = True) -> tf.Tensor:
    """`n_k` per group, float32 `[count]` (0 for a group without gradients).

    `squares` are the squared norms of `grads` (the reduced sums), `members` their groups; `to_mean` turns the
    sums into the gradients that are clipped. With `rescale`, a group whose sum of squares overflows float32 is
    measured again rescaled (`norm_from_squares`).
    """
    norms = []
    for k in range(count):
        mine = [i for i, m in enumerate(members) if m == k]
        if not mine:
            norms.append(tf.zeros([], tf.float32))
            continue
        total = tf.add_n([squares[i] for i in mine])
        norms.append(norm_from_squares(total, [grads[i] for i in mine]) if rescale else tf.sqrt(total))
    return tf.stack(norms) * to_mean


def norm_after_groups(norms: tf.Tensor, scales: tf.Tensor) -> tf.Tensor:
    """`sqrt(sum_k (s_k n_k)^2)`, finite whenever it fits float32 (`norm_from_squares`); NaN where a group's norm
    is inf or NaN (`s_k n_k` is then NaN)."""
    terms = scales * norms
    return norm_from_squares(tf.reduce_sum(tf.square(terms)), [terms])


def _same(a: Any, b: Any) -> bool:
    """Whether `a` and `b` name one variable: the same object (or the TensorFlow variable behind it), or a
    path and a variable with that path."""
    if isinstance(a, str) or isinstance(b, str):
        return (a if isinstance(a, str) else variable_path(a)) == (b if isinstance(b, str) else variable_path(b))
    return a is b or tf_variable(a) is tf_variable(b)


def _few(paths: Sequence[str]) -> str:
    return ", ".join(paths[:8]) + (f", ... ({len(paths)} in all)" if len(paths) > 8 else "")


def serialize_clip_norm(clip_norm: Any) -> Any:
    """A threshold as `ClipOptimizer.get_config` saves it: None or a number as is, a policy, schedule or
    `ClipGroups` as Keras serializes it; anything else raises `NotImplementedError`."""
    if isinstance(clip_norm, (Policy, keras.optimizers.schedules.LearningRateSchedule, ClipGroups)):
        return keras.saving.serialize_keras_object(clip_norm)
    if clip_norm is None or (isinstance(clip_norm, numbers.Real) and not isinstance(clip_norm, bool)):
        return clip_norm
    raise NotImplementedError(f"clip_norm={short_repr(clip_norm)} cannot be saved; use a number, None, a "
                              "LearningRateSchedule, a distclip policy or ClipGroups of those")


def deserialize_clip_norm(config: Any, custom_objects: Any = None) -> Any:
    """The threshold `serialize_clip_norm` saved."""
    if isinstance(config, dict):
        return keras.saving.deserialize_keras_object(config, custom_objects=custom_objects)
    return config

