"""Kernel launches in the runtime: on a GPU every aten op that computes is (at least) one kernel launch, and after K
the pruned sequence is short enough that a layer's kernels take about as long as the host needs to issue them (a 7B
layer on ~200 tokens: ~0.1 ms of bf16 work on an H200 over ~15 kernels), so an op added per decoder layer costs time
in proportion to depth that no FLOPs count shows. Counted here on CPU, where the same
ops are dispatched, against transformers' own text model (the external reference) on the tiny model with 4 and with
8 decoder layers: for every method, a prefill adds no op per layer beyond stock's but what pruning needs (one
learned-vector add per layer for GlimpsePrune's glimpse token; the compaction's gathers, one for the keys and one for
the values of each cache layer compacted, are counted apart and not bounded here), and a decode step dispatches
exactly the ops of a keep-everything decode step."""

from __future__ import annotations

import collections
from types import SimpleNamespace

import pytest
import torch
from conftest import make_batch, random_early_module, random_module
from test_methods import MASKED, build, request_masks
from torch.utils._python_dispatch import TorchDispatchMode

import glimpseprune as gp
from glimpseprune.bench.overhead import StockRun
from glimpseprune.runtime.engine import decode_step, prefill

# ops that only make views or read metadata: no kernel runs for them
NO_KERNEL = {"view", "_unsafe_view", "as_strided", "slice", "select", "transpose", "t", "expand", "unsqueeze",
             "squeeze", "permute", "alias", "detach", "reshape", "_reshape_alias", "split", "split_with_sizes",
             "unbind", "chunk", "narrow", "lift_fresh", "sym_size", "sym_stride", "is_same_size", "empty",
             "empty_strided", "empty_like"}
PER_LAYER = {"glimpse": 1}  # ops a prefill may add per decoder layer beyond stock's, KV gathers apart; others: 0


class Launches(TorchDispatchMode):
    """Counts the ops that run a kernel (``n``), by name in ``counts``."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in NO_KERNEL:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def n(self) -> int:
        return sum(self.counts.values())


def test_the_counter_skips_views_and_counts_compute():
    x = torch.randn(4, 6)
    with Launches() as c:
        x.view(6, 4).t().unsqueeze(0)[:, :2]
        (x @ x.T).softmax(-1)
    assert c.counts == {"mm": 1, "_softmax": 1}, c.counts


@torch.no_grad()
def _launches(model, processor, name):
    """Kernel ops for one 224 x 224 image: (prefill, decode step) of ``name`` through the runtime, (prefill, decode
    step) of the stock text model on the same embeddings (its own cache, no mask, the LM head on the last position),
    and the runtime prefill's gathers (``gather`` / ``index_select``: the KV compaction)."""
    ad = gp.get_adapter(model)
    batch = make_batch(processor, [[(224, 224)]])
    # a fixed budget: the same selection ops for any scores (a threshold's floor is a branch the scores may take)
    fixed = gp.SelectionConfig(fixed_keep_ratio=0.3)
    if name == "glimpse":
        method = gp.make_method("glimpse", random_module(model), fixed)
    elif name == "early_glimpse":
        method = gp.make_method("early_glimpse", random_early_module(model), fixed)
    else:
        method = build(name, SimpleNamespace(module=random_module(model), early_module=random_early_module(model)))
    extra = ()
    if name in MASKED:  # the request's keep masks, sized by a keep-everything prefill
        extra = (request_masks(name, prefill(model, ad, gp.make_method("full"), batch).n_vis),)
    prefill(model, ad, method, batch, *extra)  # warm: lazily built tables are not launches of the steady state
    with Launches() as p:
        pre = prefill(model, ad, method, batch, *extra)
    tok = pre.logits.argmax(-1)
    decode_step(model, ad, pre, tok, 0)
    with Launches() as d:
        decode_step(model, ad, pre, tok, 1)
    stock, enc = StockRun(model), ad.encode(model, batch)
    stock.prefill(enc)
    with Launches() as sp:
        logits, cache = stock.prefill(enc)
    stock.decode(cache, logits.argmax(-1), enc.next_pos)
    with Launches() as sd:
        stock.decode(cache, logits.argmax(-1), enc.next_pos + 1)
    return p.n, d.n, sp.n, sd.n, p.counts["gather"] + p.counts["index_select"]


@pytest.fixture(scope="module")
def keep_everything_decode(model, processor, deep):
    """Ops of a ``full`` decode step on the 4- and the 8-layer model."""
    return _launches(model, processor, "full")[1], _launches(*deep, "full")[1]


@pytest.mark.parametrize("name", gp.list_methods())
def test_launches_per_layer_bounded_and_decode_as_keep_everything(model, processor, deep, name,
                                                                  keep_everything_decode):
    """Four more decoder layers add no prefill op beyond what they add to stock's (GlimpsePrune: one per layer up to
    K, the glimpse vector's add) other than the compaction's gathers, two per cache layer compacted (keys and
    values: the cache holds one tensor per layer), which are counted apart; a decode step dispatches exactly the ops
    of a keep-everything decode step, and those exceed stock's by the same few at any depth."""
    shallow, deeper = _launches(model, processor, name), _launches(*deep, name)
    own = [r[0] - r[4] - r[2] for r in (shallow, deeper)]  # a prefill's non-gather ops beyond stock's
    allowed = 4 * PER_LAYER.get(name, 0)
    assert own[1] - own[0] <= allowed, (
        f"{name}: 4 more layers add {own[1] - own[0]} prefill ops beyond stock's, not counting KV gathers "
        f"(at most {allowed}): {own[0]} -> {own[1]}")
    assert (shallow[1], deeper[1]) == keep_everything_decode, (
        f"{name}: a decode step dispatches {shallow[1]} / {deeper[1]} ops, keep-everything {keep_everything_decode}")
    assert deeper[1] - deeper[3] == shallow[1] - shallow[3], (
        f"{name}: a decode step's ops beyond stock's grow with depth ({shallow[1] - shallow[3]} -> "
        f"{deeper[1] - deeper[3]})")
