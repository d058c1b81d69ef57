"""Feature detection: an attribute counts as supported only if the kernel
echoes it in its NEWSA reply (older kernels skip unknown attributes silently)."""

from __future__ import annotations

import dataclasses

import pytest

from spialloc import _wire as w
from spialloc._kernel import FEATURES, kept_in_reply
from spialloc._model import build_request

BASE = w.SaInfo(
    family=w.AF_INET,
    daddr=bytes(16),
    saddr=bytes(16),
    spi=0xC0000001,
    proto=50,
    mode=0,
    reqid=0,
    seq=0,
    flags=0,
    add_time=0,
    mark=None,
    if_id=None,
    direction=None,
    pcpu=None,
    larval=True,
)


@pytest.mark.parametrize("name, field, since, instead", FEATURES)
def test_attribute_counts_as_kept_only_when_echoed(name: str, field: str, since: str, instead: str) -> None:
    assert not kept_in_reply(BASE, field)  # a 6.1 kernel's reply to a request with the attribute
    assert kept_in_reply(dataclasses.replace(BASE, **{field: 1}), field)
    assert kept_in_reply(dataclasses.replace(BASE, **{field: 0}), field)  # pcpu 0 is a value, not absence


def test_every_feature_names_a_request_field() -> None:
    req = build_request("192.0.2.1", direction="in", pcpu=3)
    for _, field, since, _ in FEATURES:
        assert getattr(req, field) is not None
        assert tuple(int(x) for x in since.split(".")) >= (6, 10)
