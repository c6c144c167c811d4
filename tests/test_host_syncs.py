"""Host reads in the runtime: on a GPU every value read back to the host (``.item()``, ``.tolist()``, ``bool(t)``, a
boolean-mask index, ``nonzero``) stalls the CPU until the queue drains, so a read per layer or per kept token costs
time that no FLOPs count shows. Counted here on CPU, where the same calls happen: a prefill's reads do not grow with
the number of decoder layers or of visual tokens, for every method, and a decode step makes at most one."""

from __future__ import annotations

import collections
from types import SimpleNamespace

import pytest
import torch
from conftest import make_batch, random_early_module, random_module
from test_methods import MASKED, build, request_masks
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import glimpseprune as gp
from glimpseprune.runtime.engine import decode_step, prefill

# aten ops that read a device value on the host (the ``item``/``bool``/``int``/``float`` family lands in the first)
READ_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "_unique", "_unique2",
            "unique_consecutive", "unique_dim"}
# Python-level conversions that never reach the dispatcher for a CPU tensor
READ_METHODS = {"tolist", "numpy"}


class _Ops(TorchDispatchMode):
    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        index = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else ()
        if name in READ_OPS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
            self.counts[name] += 1  # a boolean-mask index sizes its output from the mask's values
        return func(*args, **(kwargs or {}))


class _Methods(TorchFunctionMode):
    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READ_METHODS:
            self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))


class HostReads:
    """Context manager counting host reads of tensor values (``n``; by op in ``counts``)."""

    def __enter__(self):
        self.counts = collections.Counter()
        self._modes = [_Methods(self.counts), _Ops(self.counts)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)

    @property
    def n(self) -> int:
        return sum(self.counts.values())


def test_the_counter_sees_each_kind_of_read():
    x = torch.tensor([1.0, -2.0, 3.0])
    with HostReads() as r:
        x.sum().item()
        bool(x[0] > 0)
        x.tolist()
        x[x > 0]
        x.nonzero()
        x.index_select(0, torch.tensor([2]))  # a tensor index: no read
        x.argmax()
    assert r.n == 5, r.counts


@torch.no_grad()
def _reads(model, processor, name, spec):
    """(host reads of one prefill, of the first decode step, the prefill's n_vis and n_kept) for one image."""
    ad = gp.get_adapter(model)
    method = build(name, SimpleNamespace(module=random_module(model), early_module=random_early_module(model)))
    batch = make_batch(processor, [spec])
    extra = ()
    if name in MASKED:  # the request's keep masks, sized by a keep-everything prefill
        extra = (request_masks(name, prefill(model, ad, gp.make_method("full"), batch).n_vis),)
    with HostReads() as r:
        pre = prefill(model, ad, method, batch, *extra)
    with HostReads() as d:
        decode_step(model, ad, pre, pre.logits.argmax(-1), 0)
    return r.n, d.n, pre.n_vis[0], pre.n_kept[0]


@pytest.mark.parametrize("name", gp.list_methods())
def test_host_reads_do_not_grow_with_tokens_or_layers(model, processor, deep, name):
    """64, 144 and 256 visual tokens (the greedy selectors pick 19 to 76 of them one by one) on the 4-layer model,
    and 64 on the 8-layer one: the same number of reads (at most as many with more layers); a decode step of one
    unpadded sample reads nothing (no key mask is passed, as stock decoding passes none; a padded batch's step reads
    once, transformers' mask function asking whether the key mask has padding)."""
    rows = [_reads(model, processor, name, spec) for spec in ([(224, 224)], [(336, 336)], [(448, 448)])]
    assert [r[2] for r in rows] == [64, 144, 256]
    prefill_reads = [r[0] for r in rows]
    assert len(set(prefill_reads)) == 1, f"{name}: prefill host reads {prefill_reads} for 64 / 144 / 256 tokens " \
                                         f"(kept {[r[3] for r in rows]})"
    deep_reads, deep_decode, _, _ = _reads(*deep, name, [(224, 224)])
    assert deep_reads <= prefill_reads[0], f"{name}: {deep_reads} host reads with 8 layers, {prefill_reads[0]} with 4"
    assert max(r[1] for r in rows) == 0 and deep_decode == 0
