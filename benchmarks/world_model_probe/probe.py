"""Probe behind the world-model trainer's attention supervision (run from the repo root, one CPU thread each).

Trains a fresh world-model architecture on 224 px scenes (1-6 objects, 1 x 1 cells) with, optionally, the ViT's
output replaced by learned embeddings of the true per-cell labels (``oracle=1``: perfect features), and prints
step, seconds, LM loss and held-out first-token exact match per family every 50 steps. Runs whose logs are in
results/world_model_probe/ (session of 2026-11-29; at that time the cell labels had no ``part`` key, so a rerun
today also feeds the part label to the oracle embeddings):

    python benchmarks/world_model_probe/probe.py min=12 amin=0.05 oracle=1              > g_oracle.log       # answer loss only, lookup + count
    python benchmarks/world_model_probe/probe.py min=7 amin=0.05 oracle=1 ground=1 fams=lookup          > m_ground.log
    python benchmarks/world_model_probe/probe.py min=7 amin=0.05 oracle=1 ground=1 hint=0 fams=lookup   > n_ground_hint.log

(``ground=L``: head-mean attention of the answer position on the answer's box tokens at layer L; ``hint=L``: on
the question's colour/shape words at layer L; all heads, weight 0.5.) Note the first run trained on lookup and count
questions, the other two on lookup only.
"""
import sys, time, json, torch, numpy as np
from glimpseprune.training import world_model as wm
from glimpseprune.data import world
args = dict(a.split("=") for a in sys.argv[1:])
torch.set_num_threads(int(args.get("threads", 1)))
minutes = float(args.get("min", 8)); big = float(args.get("big", 0.0)); fams = args.get("fams", "lookup,count").split(",")
maxc = int(args.get("maxc", 8)); maxo = int(args.get("maxo", 6)); layers = int(args.get("layers", 4)); extra = int(args.get("extra", 0))
lr = float(args.get("lr", 1e-3))
wm.TEXT = dict(wm.TEXT, num_hidden_layers=layers)
if "theta" in args: wm.TEXT["rope_parameters"] = dict(wm.TEXT["rope_parameters"], rope_theta=float(args["theta"]))
if "heads" in args: wm.TEXT.update(num_attention_heads=int(args["heads"]), num_key_value_heads=int(args["heads"]))
if args.get("qfirst"):
    import inspect, textwrap
    src = inspect.getsource(wm._qa_batch).replace('content = ([{"type": "image"}] if t == 0 else []) + [{"type": "text", "text": q}]',
        'content = [{"type": "text", "text": q}] + ([{"type": "image"}] if t == 0 else [])')
    assert "if t == 0 else [])" in src
    ns = dict(vars(wm)); exec(src, ns); wm._qa_batch = ns["_qa_batch"]
model, proc = wm.build(0); model.train()
GL = int(args.get("ground", -1)); HL = int(args.get("hint", -1))
if GL >= 0 or HL >= 0: model.set_attn_implementation("eager")
KEYW = None
def aux_loss(b, ss, atts):
    global KEYW
    tok = proc.tokenizer
    if KEYW is None: KEYW = torch.tensor(tok.convert_tokens_to_ids(["Ġ" + w for w in list(world.COLOURS) + list(world.SHAPES)]))
    ids = b["input_ids"]; first = (b["labels"] != -100).float().argmax(1) - 1
    IMG = model.config.image_token_id; tot = 0; n = 0
    for j, s in enumerate(ss):
        if GL >= 0:
            cols, rows = s.scene.cols, s.scene.rows
            m = torch.zeros(rows, cols, dtype=torch.bool)
            for x1, y1, x2, y2 in s.boxes: m[y1 // 28:y2 // 28, x1 // 28:x2 // 28] = True
            pos = (ids[j] == IMG).nonzero().flatten()[m.flatten()]
            tot = tot - torch.log(atts[GL][j, :, first[j], pos].sum(-1).mean() + 1e-6)
        if HL >= 0:
            q = torch.isin(ids[j, :first[j]], KEYW).nonzero().flatten()
            q = q[q > (ids[j] == IMG).nonzero().max()]
            if len(q): tot = tot - torch.log(atts[HL][j, :, first[j], q].sum(-1).mean() + 1e-6)
        n += 1
    return tot / n

cfg = world.WorldConfig(min_cells=8, max_cells=maxc, min_objects=1, max_objects=maxo, big_prob=big)
heads = wm.DenseHeads(192)
log = []
# stage A
vis = model.model.visual; opt = torch.optim.AdamW(list(vis.parameters()) + list(heads.parameters()), lr=1e-3)
t0 = time.time(); step = 0
while time.time() - t0 < 60 * float(args.get("amin", 1.5)):
    ss = [world.sample(9_000_000_000 + step * 32 + i, fams[i % len(fams)], cfg) for i in range(32)]
    px = proc.image_processor([world.render(s.scene) for s in ss], return_tensors="pt")
    f = vis(px["pixel_values"], grid_thw=px["image_grid_thw"], return_dict=True).pooler_output
    loss, acc = heads.loss(f, wm._dense_labels(ss)); opt.zero_grad(); loss.backward(); opt.step(); step += 1
print("A", step, round(acc, 3), flush=True)
ev = {f: [world.sample(5_000_000 + 7 * i + k, f, cfg) for i in range(40)] for k, f in enumerate(fams)}
tok = proc.tokenizer
def evaluate():
    model.eval(); out = {}
    with torch.no_grad():
        for f, ss in ev.items():
            hits = 0
            for i in range(0, 40, 20):
                b = wm._qa_batch(proc, ss[i:i+20]); lab = b.pop("labels"); lg = model(**b).logits
                for j, s in enumerate(ss[i:i+20]):
                    first = int((lab[j] != -100).nonzero()[0]); hits += int(lg[j, first-1].argmax()) == tok.convert_tokens_to_ids(s.answer)
            out[f] = hits / 40
    model.train(); return out
captured = {}
if args.get("oracle"):
    emb = torch.nn.ModuleDict({k: torch.nn.Embedding(n, 192) for k, n in wm.HEADS.items()})
    cur = {}
    if "estd" in args:
        for e in emb.values(): torch.nn.init.normal_(e.weight, std=float(args["estd"]))
    def ov(m, a, o):
        lab = wm._dense_labels(cur["ss"])
        o.pooler_output = sum(emb[k](lab[k]) for k in emb) 
        return o
    vis.register_forward_hook(ov)
    heads = torch.nn.ModuleList([heads, emb])
    _orig = wm._qa_batch
    def qb(proc, ss, **kw):
        cur["ss"] = ss; return _orig(proc, ss, **kw)
    wm._qa_batch = qb
vis.register_forward_hook(lambda m, a, o: captured.__setitem__("f", o.pooler_output))
lp = [p for n, p in model.named_parameters() if not n.startswith("model.visual")]
opt = torch.optim.AdamW([{"params": lp}, {"params": list(vis.parameters()), "lr": 0.3 * lr}, {"params": list(heads.parameters())}], lr=lr)
t0 = time.time(); step = 0
while time.time() - t0 < minutes * 60:
    ss = [world.sample(8_000_000_000 + step * 32 + i, fams[i % len(fams)], cfg) for i in range(32)]
    b = wm._qa_batch(proc, ss, extra=extra, seed=step)
    out = model(**b, output_attentions=(GL >= 0 or HL >= 0)); dense, _ = (heads[0] if isinstance(heads, torch.nn.ModuleList) else heads).loss(captured.pop("f"), wm._dense_labels(ss))
    loss = out.loss + 0.5 * dense + (0.5 * aux_loss(b, ss, out.attentions) if (GL >= 0 or HL >= 0) else 0); opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); step += 1
    if step % 50 == 0:
        print(step, round(time.time() - t0), round(out.loss.item(), 3), evaluate(), flush=True)
