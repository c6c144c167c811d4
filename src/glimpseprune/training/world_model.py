"""Train the embedded tiny Qwen2.5-VL from scratch on the synthetic world (the base model the library ships).

Two stages, as a VLM's pretraining then instruction tuning:

A. vision pretraining: the ViT + merger with linear heads on every merged visual token, dense per-cell labels
   (colour / shape / glyph / which part of its object, background); it stops early at 99 % of object tokens right
   on every head;
B. question answering: the whole model, the ViT at 0.3x the LLM's learning rate, cross-entropy on the answer and its
   ``<|im_end|>``, the dense loss kept as an auxiliary term, attention supervision of the two hops that answering
   needs (see ``attention_supervision``: the answer position attends to the question's object words at
   ``--hint-layer``, then to the answer's box tokens at ``--ground-layer``) and a curriculum from small scenes to the
   whole world.

Why the attention supervision: with the answer loss alone a small model sits on a plateau where neither hop helps
until the other exists. Measured on 224 px scenes with perfect per-token features fed in place of the ViT
(``benchmarks/world_model_probe/probe.py``): trained on lookup and count questions with the answer loss alone,
lookups stayed at about 60 % for 600 steps; trained on lookups with both hops supervised, 100 % within 100 steps.

Run (wall-clock budgeted; the result is a real ``Qwen2_5_VLForConditionalGeneration`` directory with its
processor, loadable offline with ``from_pretrained`` / ``AutoProcessor``; it is saved after every periodic eval too)::

    python -m glimpseprune.training.world_model --out runs/world-model
    python -m glimpseprune.training.world_model --out runs/more --init runs/world-model --vision-minutes 10

The second form continues a saved model (stage A again, with fresh heads, until 99 %, then stage B). The shipped
weights are the end of a chain of five such runs on 2 CPU cores (87 minutes; arguments, commits and logs in
``assets/world/world_model_train_log.json``); their final quick eval (100 questions per family) was 91.2 %.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

from ..adapters.qwen2_5_vl_processing import QwenVLProcessor, make_tiny_qwen_tokenizer
from ..data import world
from ..processing import save_processor
from ..testing import tiny_qwen2_5_vl_config

logger = logging.getLogger(__name__)

MIN_PIXELS = 56 * 56
MAX_PIXELS = 1024 * 28 * 28  # up to 1024 visual tokens (e.g. 896 x 896)
TEXT = {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0, "mrope_section": [8, 8, 8]}}
VISION = {"depth": 2, "hidden_size": 128, "intermediate_size": 384, "num_heads": 4, "fullatt_block_indexes": [1]}
HEADS = {"colour": len(world.COLOURS) + 1, "shape": len(world.SHAPES) + 1, "glyph": len(world.GLYPHS) + 1,
         "part": 6}
TRAIN_SEED0 = 7_000_000_000  # training scenes never collide with write_split's seed * 10^6 + i


def build(seed: int = 0):
    """Fresh (model, processor) of the world-model architecture."""
    tokenizer = make_tiny_qwen_tokenizer(words=world.corpus())
    config = tiny_qwen2_5_vl_config(tokenizer=tokenizer, text_config=TEXT, vision_config=VISION)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).float()
    text = config.text_config
    model.generation_config = GenerationConfig(bos_token_id=text.bos_token_id, pad_token_id=text.pad_token_id,
                                               eos_token_id=[text.eos_token_id, text.pad_token_id], do_sample=False)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14,
                                               temporal_patch_size=2, merge_size=2)
    processor = QwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=tokenizer.chat_template)
    return model, processor


class DenseHeads(nn.Module):
    """Linear colour / shape / glyph classifiers on merged visual tokens (training aid, not shipped)."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(width, n) for k, n in HEADS.items()})

    def loss(self, feats: torch.Tensor, labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Mean cross-entropy of the heads, and the accuracy (all heads right) on object tokens."""
        total, correct = 0.0, []
        for k, head in self.heads.items():
            logits = head(feats)
            total = total + F.cross_entropy(logits, labels[k])
            correct.append(logits.argmax(-1) == labels[k])
        obj = labels["colour"] > 0
        return total / len(self.heads), float(torch.stack(correct).all(0)[obj].float().mean())


def _dense_labels(samples) -> dict[str, torch.Tensor]:
    per = [world.cell_labels(s.scene) for s in samples]
    return {k: torch.from_numpy(np.concatenate([p[k].reshape(-1) for p in per])) for k in HEADS}


def _curriculum(progress: float) -> world.WorldConfig:
    """Scenes grow with training progress: 224 px with one or two objects first (with one object, reading an
    attribute needs no binding, so the "attend to an object, read it" circuit forms before the "find the named
    object" one), then up to four objects, then up to seven at 224-336 px, then the whole world (224-448 px)."""
    if progress < 0.15:
        return world.WorldConfig(min_cells=8, max_cells=8, min_objects=1, max_objects=2)
    if progress < 0.35:
        return world.WorldConfig(min_cells=8, max_cells=8, min_objects=1, max_objects=4)
    if progress < 0.6:
        return world.WorldConfig(min_cells=8, max_cells=12, min_objects=1, max_objects=7)
    return world.WorldConfig()


def _samples(start: int, n: int, cfg: world.WorldConfig, family_weights: dict[str, float] | None = None):
    """n training samples; families uniform (the world's own draw) unless ``family_weights`` reweights them."""
    if not family_weights:
        return [world.sample(TRAIN_SEED0 + start + i, cfg=cfg) for i in range(n)]
    w = np.array([family_weights.get(f, 1.0) for f in world.FAMILIES], dtype=float)
    fams = np.random.default_rng(TRAIN_SEED0 + start).choice(len(world.FAMILIES), size=n, p=w / w.sum())
    return [world.sample(TRAIN_SEED0 + start + i, world.FAMILIES[f], cfg=cfg) for i, f in enumerate(fams)]


def extra_questions(sample: world.Sample, seed: int, k: int) -> list[tuple[str, str]]:
    """Up to k more (question, answer) pairs about the same scene, one per other family where one exists: several
    answers per rendered image give the LLM several times the signal for little more compute."""
    rng = np.random.default_rng(seed)
    objs = sample.scene.objects
    out = []
    for fam in rng.permutation(world.FAMILIES):
        if fam == sample.family or len(out) >= k:
            continue
        if fam == "count":
            colours = sorted({o.colour for o in objs})
            c = colours[int(rng.integers(len(colours)))]
            n = sum(o.colour == c for o in objs)
            q = (f"How many {c} objects are there?", world.NUMBERS[n], None) if n <= 4 else None
        elif fam == "exist":
            missing = None
            if rng.random() < 0.5:
                specs = {(o.shape, o.colour) for o in objs}
                missing = world._distinct_specs(1, rng, avoid=specs)[0]
            q = world._q_exist(objs, rng, missing)
        else:
            q = {"lookup": world._q_lookup, "glyph": world._q_glyph, "relation": world._q_relation}[fam](objs, rng)
        if q is not None:
            out.append((q[0], q[1]))
    return out


def _qa_batch(processor, samples, extra: int = 0, seed: int = 0):
    """Left-padded chats of prompt + answer + <|im_end|> (the image in the first turn, then ``extra`` more
    question/answer turns about the same scene); labels on every answer and its <|im_end|> only."""
    tok = processor.tokenizer
    texts = []
    for i, s in enumerate(samples):
        turns = [(s.question, s.answer)] + (extra_questions(s, seed + i, extra) if extra else [])
        msgs = []
        for t, (q, a) in enumerate(turns):
            content = ([{"type": "image"}] if t == 0 else []) + [{"type": "text", "text": q}]
            msgs += [{"role": "user", "content": content},
                     {"role": "assistant", "content": [{"type": "text", "text": a}]}]
        texts.append(processor.apply_chat_template(msgs, tokenize=False).rstrip("\n"))
    images = [world.render(s.scene) for s in samples]
    batch = processor(text=texts, images=images, padding=True, padding_side="left", return_mm_token_type_ids=True,
                      return_tensors="pt")
    ids = batch["input_ids"]
    answers = torch.tensor(sorted(tok.convert_tokens_to_ids(world.answer_vocabulary())))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    # an answer is the one token right before an <|im_end|> that is an answer word (questions end with "?")
    is_answer = torch.isin(ids[:, :-1], answers) & (ids[:, 1:] == end)
    label_at = torch.zeros_like(ids, dtype=torch.bool)
    label_at[:, :-1] |= is_answer
    label_at[:, 1:] |= is_answer
    batch["labels"] = torch.where(label_at, ids, torch.full_like(ids, -100))
    return batch


def train_vision(model, processor, heads: DenseHeads, minutes: float, batch: int, lr: float, log: list) -> None:
    visual = model.model.visual
    params = list(visual.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t0, step, acc_ema = time.time(), 0, 0.0
    while time.time() - t0 < minutes * 60 and acc_ema < 0.99:
        samples = _samples(10_000_000 + step * batch, batch, _curriculum(1.0))
        px = processor.image_processor([world.render(s.scene) for s in samples], return_tensors="pt")
        feats = visual(px["pixel_values"], grid_thw=px["image_grid_thw"], return_dict=True).pooler_output
        loss, acc = heads.loss(feats, _dense_labels(samples))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        acc_ema = acc if step == 0 else 0.9 * acc_ema + 0.1 * acc
        step += 1
        if step % 20 == 0:
            logger.info("vision step %d loss %.4f object-token-acc %.3f (%.0fs)", step, loss.item(), acc_ema,
                        time.time() - t0)
            log.append({"stage": "vision", "step": step, "loss": loss.item(), "object_token_acc": acc_ema,
                        "seconds": time.time() - t0})


@torch.no_grad()
def quick_eval(model, processor, n_per_family: int = 40) -> dict[str, float]:
    """First-token exact match at full tokens on held-out scenes (seeds of write_split's seed 1 range)."""
    model.eval()
    tok = processor.tokenizer
    out = {}
    for fam in world.FAMILIES:
        samples = [world.sample(1_000_000 + 5 * i + world.FAMILIES.index(fam), fam) for i in range(n_per_family)]
        hits = 0
        for i in range(0, len(samples), 20):
            chunk = samples[i:i + 20]
            batch = _qa_batch(processor, chunk)
            at = _first_answer(batch)
            del batch["labels"]
            logits = model(**batch).logits
            for b, s in enumerate(chunk):
                hits += int(logits[b, at[b]].argmax()) == int(tok.convert_tokens_to_ids(s.answer))
        out[fam] = hits / len(samples)
    out["mean"] = float(np.mean([out[f] for f in world.FAMILIES]))
    model.train()
    return out


def _first_answer(inputs: dict) -> torch.Tensor:
    """Per row, the position that predicts the first answer token."""
    return (inputs["labels"] != -100).float().argmax(dim=1) - 1


def attention_supervision(model, processor, inputs: dict, samples, attentions, hint_layer: int,
                          ground_layer: int, heads: int) -> torch.Tensor:
    """Supervision of the two attention hops that answering needs (mean over rows of -log attention mass, over the
    first ``heads`` heads of a layer, the others stay free):

    1. hint (``hint_layer``): the position that predicts the answer attends, with head 0, to the question's object
       words (its colour and shape words: *what* to look for) and, with heads 1 .. ``heads``-1, to the whole
       question (*what kind* of answer: without it, on large images the free heads' view of the question drowns in
       visual tokens and glyph questions got yes/no answers);
    2. ground (``ground_layer``): the same position attends to the visual tokens of the answer's boxes, i.e. it
       finds the named object(s). Not applied when the answer is an absence (exist "no": no object matches);
    3. count (``ground_layer``, head ``heads``): for counting questions, one more head is taught a uniform attention
       over one token per counted object (its top-left cell) and ``<|vision_start|>`` as a sink, so its output carries
       1 / (n + 1): softmax attention normalises the mass away, and with the answer loss alone counting stayed at
       about 50 %.

    Without them the model sits on a plateau where neither hop helps until the other exists: with perfect per-token
    features and answer loss alone, lookups stayed near 60 % for 600 steps; with both hops supervised, 100 % in 100
    steps (module docstring). A negative layer switches a hop off."""
    from ..registry import get_adapter

    ids = inputs["input_ids"]
    tok = processor.tokenizer
    words = torch.tensor(tok.convert_tokens_to_ids(["\u0120" + w for w in list(world.COLOURS) + list(world.SHAPES)]))
    image = model.config.image_token_id
    end = tok.convert_tokens_to_ids("<|im_end|>")
    first = _first_answer(inputs)
    n_heads = attentions[0].shape[1]
    masks = (get_adapter(model).box_masks(model, processor, inputs, [s.boxes for s in samples],
                                          [s.scene.size for s in samples]) if ground_layer >= 0 else None)
    terms = []
    for b, s in enumerate(samples):
        img_pos = (ids[b] == image).nonzero().flatten()
        if hint_layer >= 0:
            start = int(img_pos.max()) + 2  # after <|vision_end|>
            stop = start + int((ids[b, start:] == end).nonzero()[0])  # the question ends at its <|im_end|>
            q = torch.arange(start, stop)
            obj = q[torch.isin(ids[b, start:stop], words)]
            att = attentions[hint_layer][b, :heads, first[b]]
            if len(obj):
                terms.append(-torch.log(att[0, obj].sum() + 1e-6))
            if heads > 1:
                terms.append(-torch.log(att[1:, q].sum(-1).mean() + 1e-6))
        if ground_layer >= 0 and s.family == "count" and heads < n_heads:
            cols = s.scene.cols
            assert len(img_pos) == cols * s.scene.rows, "world images map one 28 px cell to one token"
            anchors = [img_pos[(y1 // world.CELL) * cols + x1 // world.CELL] for x1, y1, _, _ in s.boxes]
            target = torch.stack([img_pos.min() - 1, *anchors])  # <|vision_start|> + one token per object
            terms.append(-torch.log(attentions[ground_layer][b, heads, first[b], target] + 1e-6).mean())
        if ground_layer >= 0 and not (s.family == "exist" and s.answer == "no"):
            box = torch.as_tensor(masks[b]).flatten()
            if box.any():
                pos = img_pos[box]
                terms.append(-torch.log(attentions[ground_layer][b, :heads, first[b], pos].sum(-1).mean() + 1e-6))
    return torch.stack(terms).mean() if terms else attentions[0].new_zeros(())


def train_qa(model, processor, heads: DenseHeads, minutes: float, batch: int, lr: float, log: list,
             eval_every: float = 4.0, extra: int = 0, on_eval=None, attn_weight: float = 0.5,
             hint_layer: int = 0, ground_layer: int = 1, attn_heads: int = 2, start_progress: float = 0.0,
             seed_offset: int = 0, family_weights: dict[str, float] | None = None) -> None:
    visual = model.model.visual
    for p in visual.parameters():
        p.requires_grad_(False)
    late = list(visual.parameters())  # the whole ViT keeps training, at 0.3x the LLM's learning rate
    for p in late:
        p.requires_grad_(True)
    late_ids = {id(p) for p in late}
    params = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) not in late_ids], "scale": 1.0},
                             {"params": late, "scale": 0.3}], lr=lr, weight_decay=0.0)
    captured = {}
    hook = visual.register_forward_hook(lambda m, a, o: captured.__setitem__("feats", o.pooler_output))
    t0, step, last_eval, budget = time.time(), 0, time.time(), minutes * 60
    try:
        while (elapsed := time.time() - t0) < budget:
            frac = elapsed / budget
            for g in opt.param_groups:  # warm-up then cosine, on wall-clock progress
                g["lr"] = g["scale"] * lr * min(1.0, frac / 0.03) * 0.5 * (1 + math.cos(math.pi * frac))
            stage = start_progress + (1 - start_progress) * frac
            samples = _samples(seed_offset + step * batch, batch, _curriculum(stage), family_weights)
            inputs = _qa_batch(processor, samples, extra=extra, seed=TRAIN_SEED0 + seed_offset + step * batch)
            out = model(**inputs, output_attentions=attn_weight > 0)
            dense, _ = heads.loss(captured.pop("feats"), _dense_labels(samples))
            attn = (attention_supervision(model, processor, inputs, samples, out.attentions, hint_layer,
                                          ground_layer, attn_heads) if attn_weight > 0 else torch.zeros(()))
            loss = out.loss + 0.5 * dense + attn_weight * attn
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if step % 20 == 0:
                logger.info("qa step %d lm %.4f dense %.4f attn %.4f (%.0fs)", step, out.loss.item(), dense.item(),
                            attn.item(), elapsed)
                log.append({"stage": "qa", "step": step, "lm_loss": out.loss.item(), "dense_loss": dense.item(),
                            "attn_loss": attn.item(), "seconds": elapsed})
            if time.time() - last_eval > eval_every * 60:
                last_eval = time.time()
                ev = quick_eval(model, processor)
                logger.info("eval %s", json.dumps(ev))
                log.append({"stage": "eval", "step": step, "seconds": time.time() - t0, **ev})
                if on_eval is not None:
                    on_eval(ev)
    finally:
        hook.remove()


def _family_weights(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, text.split(",")):
        fam, _, w = item.partition("=")
        if fam not in world.FAMILIES or not w:
            raise SystemExit(f"--family-weights: expected family=weight, family one of {world.FAMILIES}; got {item!r}")
        out[fam] = float(w)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the embedded world model (tiny Qwen2.5-VL) from scratch.")
    ap.add_argument("--out", required=True, help="output folder (model + processor + train_log.json)")
    ap.add_argument("--vision-minutes", type=float, default=5.0,
                    help="time cap of stage A (it stops early at 99%% object-token accuracy)")
    ap.add_argument("--qa-minutes", type=float, default=55.0, help="wall-clock budget of stage B")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra-questions", type=int, default=0,
                    help="more question/answer turns per training image (about the same scene)")
    ap.add_argument("--attn-weight", type=float, default=0.5,
                    help="weight of the attention supervision (0 switches it off; see attention_supervision)")
    ap.add_argument("--hint-layer", type=int, default=0,
                    help="LLM layer where the answer position is taught to attend to the question's object words")
    ap.add_argument("--ground-layer", type=int, default=1,
                    help="LLM layer where the answer position is taught to attend to the answer's box tokens")
    ap.add_argument("--attn-heads", type=int, default=2, help="supervise the first this-many heads (others free)")
    ap.add_argument("--start-progress", type=float, default=0.0,
                    help="start the scene curriculum this far in (0-1), e.g. when continuing a run with --init")
    ap.add_argument("--family-weights", default="",
                    help="sampling weights of question families, e.g. 'count=3,relation=2' (others 1)")
    ap.add_argument("--seed-offset", type=int, default=0,
                    help="offset of the training scenes' seeds (a continued run should not replay the first one's)")
    ap.add_argument("--init", help="continue from a saved world model folder instead of a fresh initialisation")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    model, processor = build(args.seed)
    if args.init:  # continue training a saved model (same architecture and tokenizer)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32,
                                                                   local_files_only=True, use_kernels=False)
    if args.attn_weight > 0:
        model.set_attn_implementation("eager")  # the attention supervision reads attention probabilities
    model.train()
    heads = DenseHeads(model.config.text_config.hidden_size)
    log: list = []
    if args.vision_minutes > 0:
        train_vision(model, processor, heads, args.vision_minutes, args.batch, args.lr, log)
    out = Path(args.out)
    n_params = sum(p.numel() for p in model.parameters())

    def save(final: dict) -> None:  # after every periodic eval too, so a long run can be stopped early
        impl = model.config._attn_implementation
        model.set_attn_implementation("sdpa")  # what users load by default
        model.save_pretrained(str(out), safe_serialization=True)
        model.set_attn_implementation(impl)
        save_processor(processor, out)
        (out / "train_log.json").write_text(json.dumps({"args": vars(args), "params": n_params, "final": final,
                                                         "log": log}, indent=1))

    train_qa(model, processor, heads, args.qa_minutes, args.batch, args.lr, log, extra=args.extra_questions,
             on_eval=save, attn_weight=args.attn_weight, hint_layer=args.hint_layer, ground_layer=args.ground_layer,
             attn_heads=args.attn_heads, start_progress=args.start_progress, seed_offset=args.seed_offset,
             family_weights=_family_weights(args.family_weights))
    final = quick_eval(model, processor, n_per_family=100)
    logger.info("final quick eval %s", json.dumps(final))
    model.eval()
    save(final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
