"""Self-supervised methods: a registry of names to classes, and a builder."""

from collections.abc import Callable

from torch import nn

from msvq.methods.base import Method
from msvq.methods.mocov2 import MoCoV2
from msvq.methods.relational import MQ, MSV, MSVQ, RelationalDistillation, ReSSL

METHODS: dict[str, type[Method]] = {
    "msvq": MSVQ,
    "msv": MSV,
    "mq": MQ,
    "ressl": ReSSL,
    "mocov2": MoCoV2,
}


def build_method(
    name: str,
    backbone_fn: Callable[[], nn.Module],
    *,
    proj_hidden: int,
    proj_dim: int,
    m1: float,
    m2: float,
    tau_s: float,
    tau_t: float,
    queue_size: int,
    shuffle_bn: bool = True,
) -> Method:
    """Build the method registered as `name` with a fresh backbone from backbone_fn().

    backbone_fn() must return a module with a `feature_dim` attribute. For mocov2, m1 is
    the key encoder's momentum and tau_s the InfoNCE temperature, and m2 and tau_t are
    unused. For ressl and msv, m2 is unused.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}, expected one of {sorted(METHODS)}")
    method_class = METHODS[name]
    common = dict(proj_hidden=proj_hidden, proj_dim=proj_dim, queue_size=queue_size, shuffle_bn=shuffle_bn)

    if issubclass(method_class, MoCoV2):
        return method_class(backbone_fn, momentum=m1, temperature=tau_s, **common)
    return method_class(backbone_fn, m1=m1, m2=m2, tau_s=tau_s, tau_t=tau_t, **common)


__all__ = ["METHODS", "MQ", "MSV", "MSVQ", "Method", "MoCoV2", "ReSSL", "RelationalDistillation", "build_method"]
