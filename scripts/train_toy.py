"""Train the toy-omni model (a small Qwen2.5-Omni thinker) from scratch on the toy world, on CPU.

    python scripts/train_toy.py                       # the shipped run (see docs/toy-model.md)
    python scripts/train_toy.py --steps 300 --out /tmp/toy-omni --train 800   # a quick try

What it does, in order:
1. builds the toy processor and a small thinker config (``nnsight_av.toy.toy_config``);
2. renders the training, validation and test clips (disjoint seeds) and turns each into
   processor tensors once: the video processor's patches, and log-mel features computed in
   batch with exactly the Whisper extractor's arithmetic (checked against ``model.prepare``
   on real inputs before training starts);
3. trains with AdamW on a mix of the lettered multiple-choice task (some of it with the
   video blacked out or the audio silenced, so single-modality runs are in-distribution)
   and the caption task; the loss is the mean over examples of each example's mean token
   cross-entropy on the answer;
4. saves safetensors weights, config and processor files, then evaluates on the held-out
   test clips (av / a / v multiple choice, dominance counts, greedy captions) and writes the
   curves (PNG) and every number (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nnsight_av import toy
from nnsight_av.adapters.qwen2_5_omni import Qwen25OmniAdapter
from nnsight_av.model import AVModel

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(toy.ASSET_DIR), help="folder for weights, config, processor, log")
    parser.add_argument("--figure", default=str(REPO / "docs" / "toy-model-curves.png"))
    parser.add_argument("--seed", type=int, default=0, help="torch / sampling seed")
    parser.add_argument("--train", type=int, default=4000, help="training clips (each used for both tasks)")
    parser.add_argument("--val", type=int, default=200, help="validation clips for the curves")
    parser.add_argument("--test", type=int, default=500, help="held-out test clips for the final figures")
    parser.add_argument("--train-seed", type=int, default=1, help="data seed of the training clips")
    parser.add_argument("--val-seed", type=int, default=2)
    parser.add_argument("--test-seed", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--caption-frac", type=float, default=0.35, help="share of caption examples")
    parser.add_argument("--ablate-frac", type=float, default=0.3,
                        help="share of multiple-choice examples with one modality removed")
    parser.add_argument("--silent-share", type=float, default=0.5,
                        help="of those, the share with the audio silenced (the rest: video blacked out)")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="if set, lower --steps after 40 steps so training fits this wall time (logged)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--encoder-width", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--init", default=None,
                        help="continue from the model in this folder (its config wins over the size flags; "
                             "its training_log.json becomes the earlier stages of the new log)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


# -- features ---------------------------------------------------------------------------------------------------


def log_mel(waves: list[np.ndarray], extractor, frames: int) -> torch.Tensor:
    """Whisper log-mel features of several clips at once, equal to what the Omni processor computes
    (it pads to 30 s; zeros after the clip only reach the first frames past it, and the global
    maximum is taken with them included), cropped to the clip's ``frames``."""
    w = torch.as_tensor(np.stack(waves), dtype=torch.float32)
    w = F.pad(w, (0, 4 * extractor.n_fft))
    stft = torch.stft(w, extractor.n_fft, extractor.hop_length, window=torch.hann_window(extractor.n_fft),
                      return_complex=True)
    mel = torch.from_numpy(extractor.mel_filters).float().T @ (stft[..., :-1].abs() ** 2)
    log = torch.clamp(mel, min=1e-10).log10()
    log = torch.maximum(log, log.amax(dim=(1, 2), keepdim=True) - 8.0)
    return ((log + 4.0) / 4.0)[..., :frames]


def video_patches(frames: np.ndarray, processor) -> torch.Tensor:
    out = processor.video_processor(videos=[frames], do_sample_frames=False, return_tensors="pt",
                                    **toy.PROCESSOR_KWARGS["videos_kwargs"])
    return out["pixel_values_videos"]


class Features:
    """Processor tensors of a set of clips, held in float16 (cast back per batch)."""

    def __init__(self, records, processor, desc: str):
        extractor = processor.feature_extractor
        self.frames_audio = int(records[0].audio.shape[0] // extractor.hop_length)
        pixels, audio = [], []
        for start in tqdm(range(0, len(records), 64), desc=f"features ({desc})"):
            chunk = records[start:start + 64]
            pixels += [video_patches(r.frames, processor).half() for r in chunk]
            audio.append(log_mel([r.audio for r in chunk], extractor, self.frames_audio).half())
        self.pixels = torch.stack(pixels)                    # [N, patches, 1176]
        self.audio = torch.cat(audio)                        # [N, 128, frames]
        self.black = video_patches(np.zeros_like(records[0].frames), processor).half()
        self.silent = log_mel([np.zeros_like(records[0].audio)], extractor, self.frames_audio)[0].half()
        self.entity = torch.tensor([toy.ENTITY_NAMES.index(r.entity) for r in records])
        self.records = records

    def to(self, device) -> "Features":
        for name in ("pixels", "audio", "black", "silent"):
            setattr(self, name, getattr(self, name).to(device))
        return self


# -- batches -----------------------------------------------------------------------------------------------------


class Batcher:
    """Turns (clip index, task, ablation) triples into thinker keyword arguments and target masks."""

    def __init__(self, processor, prompt_data: dict[str, dict], grid: torch.Tensor, seconds_per_grid: torch.Tensor):
        self.tokenizer = processor.tokenizer
        self.prompts = {task: data["input_ids"][0] for task, data in prompt_data.items()}
        self.grid, self.seconds = grid, seconds_per_grid
        self.im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = self.tokenizer.pad_token_id

    def target(self, record, task: str) -> list[int]:
        text = record.answer if task == "mc" else record.caption
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.im_end]

    def build(self, feats: Features, items, with_targets: bool = True) -> tuple[dict, torch.Tensor, torch.Tensor]:
        rows, masks = [], []
        for index, task, ablate in items:
            prompt = self.prompts[task]
            target = self.target(feats.records[index], task) if with_targets else []
            ids = torch.cat([prompt, torch.tensor(target, dtype=torch.long)])
            rows.append(ids)
            mask = torch.zeros(len(ids), dtype=torch.bool)
            mask[len(prompt):] = True
            masks.append(mask)
        longest = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), longest), self.pad, dtype=torch.long)
        attention = torch.zeros((len(rows), longest), dtype=torch.long)
        target_mask = torch.zeros((len(rows), longest), dtype=torch.bool)
        for i, (ids, mask) in enumerate(zip(rows, masks)):
            input_ids[i, :len(ids)] = ids
            attention[i, :len(ids)] = 1
            target_mask[i, :len(ids)] = mask
        pixels = torch.cat([feats.black if ablate == "video" else feats.pixels[index] for index, _, ablate in items])
        audio = torch.stack([feats.silent if ablate == "audio" else feats.audio[index] for index, _, ablate in items])
        n = len(items)
        data = dict(input_ids=input_ids, attention_mask=attention, pixel_values_videos=pixels.float(),
                    video_grid_thw=self.grid.repeat(n, 1), video_second_per_grid=self.seconds.repeat(n),
                    input_features=audio.float(), feature_attention_mask=torch.ones(n, audio.shape[-1], dtype=torch.long),
                    use_audio_in_video=True)
        return data, target_mask, input_ids


def to_device(data: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in data.items()}


def loss_of(module, data, target_mask, input_ids) -> torch.Tensor:
    device = module.device
    data, target_mask, input_ids = to_device(data, device), target_mask.to(device), input_ids.to(device)
    logits = module(**data).logits
    # Position t predicts token t + 1: shift the target mask left by one.
    predict = target_mask[:, 1:]
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    token_loss = -log_probs.gather(-1, input_ids[:, 1:, None])[..., 0]
    per_example = (token_loss * predict).sum(1) / predict.sum(1).clamp(min=1)
    return per_example.mean()


# -- evaluation -------------------------------------------------------------------------------------------------


@torch.no_grad()
def mc_predictions(module, batcher, feats, ablate: str | None, letter_ids: torch.Tensor, batch: int = 50):
    """Letter probabilities ``[N, options]`` at the first answer position (max of "X" and " X")."""
    out = []
    for start in range(0, len(feats.records), batch):
        items = [(i, "mc", ablate) for i in range(start, min(start + batch, len(feats.records)))]
        data, _, _ = batcher.build(feats, items, with_targets=False)
        logits = module(**to_device(data, module.device)).logits[:, -1].float().cpu()
        probs = logits.softmax(-1)
        out.append(torch.maximum(probs[:, letter_ids[0]], probs[:, letter_ids[1]]))
    return torch.cat(out)


@torch.no_grad()
def caption_token_accuracy(module, batcher, feats, batch: int = 50) -> float:
    correct = total = 0
    for start in range(0, len(feats.records), batch):
        items = [(i, "caption", None) for i in range(start, min(start + batch, len(feats.records)))]
        data, mask, ids = batcher.build(feats, items)
        predicted = module(**to_device(data, module.device)).logits[:, :-1].argmax(-1).cpu()
        predict = mask[:, 1:]
        correct += int(((predicted == ids[:, 1:]) & predict).sum())
        total += int(predict.sum())
    return correct / max(total, 1)


@torch.no_grad()
def greedy_captions(module, batcher, feats, max_new_tokens: int = 24, batch: int = 50) -> list[str]:
    texts = []
    for start in tqdm(range(0, len(feats.records), batch), desc="captions"):
        items = [(i, "caption", None) for i in range(start, min(start + batch, len(feats.records)))]
        data, _, ids = batcher.build(feats, items, with_targets=False)
        generated = module.generate(**to_device(data, module.device), max_new_tokens=max_new_tokens,
                                    do_sample=False).cpu()
        for row in generated[:, ids.shape[1]:]:
            texts.append(batcher.tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def caption_scores(texts, records) -> dict[str, float]:
    exact = heard = shape = colour = distractor = 0
    hallucinated_captions = hallucinated_mentions = mentions = 0
    for text, record in zip(texts, records):
        parsed = toy.parse_caption(text)
        exact += text == record.caption
        heard += parsed["heard"] == [record.entity]
        shape += bool(parsed["seen"]) and parsed["seen"][0][1] == record.shape
        colour += bool(parsed["seen"]) and parsed["seen"][0][0] == record.colour
        shown = [s for _, s in parsed["seen"][1:]]
        distractor += shown == ([record.distractor] if record.distractor else [])
        said = toy.caption_objects(text)
        wrong = [w for w in said if w not in set(record.objects)]
        hallucinated_captions += bool(wrong)
        hallucinated_mentions += len(wrong)
        mentions += len(said)
    n = len(records)
    return dict(exact_match=exact / n, heard_entity=heard / n, seen_shape=shape / n, seen_colour=colour / n,
                distractor=distractor / n, chair_s=hallucinated_captions / n,
                chair_i=hallucinated_mentions / max(mentions, 1))


def dominance(answers: dict[str, torch.Tensor], records) -> dict[str, dict[str, int]]:
    """Counts of audio- and video-dominant clips (METHOD.md section 4) per identified_by group."""
    out: dict[str, dict[str, int]] = {}
    for group in ("audio", "video", "both", "all"):
        keep = torch.tensor([group == "all" or r.identified_by == group for r in records])
        av, a, v = answers["av"][keep], answers["a"][keep], answers["v"][keep]
        out[group] = dict(clips=int(keep.sum()), audio_dominant=int(((av == a) & (av != v)).sum()),
                          video_dominant=int(((av == v) & (av != a)).sum()))
    return out


# -- main -------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    started = time.time()
    out_dir = Path(args.out)
    previous = None
    if args.init and (Path(args.init) / "training_log.json").exists():
        previous = json.loads((Path(args.init) / "training_log.json").read_text())

    processor = toy.toy_processor()
    config = toy.toy_config(processor.tokenizer, hidden=args.hidden, layers=args.layers, heads=args.heads,
                            kv_heads=args.kv_heads, intermediate=args.intermediate, encoder_width=args.encoder_width)
    config._attn_implementation = "sdpa"
    for sub in (config.text_config, config.audio_config, config.vision_config):
        sub._attn_implementation = "sdpa"
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    if args.init:
        module = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            args.init, attn_implementation="sdpa", local_files_only=True).to(args.device)
    else:
        module = Qwen2_5OmniThinkerForConditionalGeneration(config).to(args.device)
    wrapped = AVModel(module, adapter=Qwen25OmniAdapter, processor=processor, default_system=toy.DEFAULT_SYSTEM,
                      processor_kwargs=toy.PROCESSOR_KWARGS)
    parameters = sum(p.numel() for p in module.parameters())
    print(f"thinker: {parameters / 1e6:.2f} M parameters", flush=True)

    train = toy.make_dataset(args.train, seed=args.train_seed, progress=True)
    val = toy.make_dataset(args.val, seed=args.val_seed)
    test = toy.make_dataset(args.test, seed=args.test_seed, progress=True)
    feats = {name: Features(records, processor, name) for name, records in
             (("train", train), ("val", val), ("test", test))}

    # The prompts are the same token sequence for every clip of a task: take them (and the grid)
    # from the real inference path, and check the precomputed media tensors against it.
    prompt_data = {}
    for task in toy.TASKS:
        record = dataclasses.replace(val[0], task=task,
                                     prompt=toy.mc_prompt() if task == "mc" else toy.CAPTION_PROMPT)
        ex = record.prepare(wrapped)
        prompt_data[task] = ex.data
        assert torch.allclose(ex.data["pixel_values_videos"], feats["val"].pixels[0].float(), atol=5e-3), \
            "precomputed video patches differ from the processor's"
        audio_real = ex.data["input_features"][0][:, ex.data["feature_attention_mask"][0].bool()]
        assert torch.allclose(audio_real, feats["val"].audio[0].float(), atol=5e-3), \
            "precomputed log-mel features differ from the processor's"
    for value in feats.values():
        value.to(args.device)
    grid = prompt_data["mc"]["video_grid_thw"]
    seconds = torch.as_tensor(prompt_data["mc"]["video_second_per_grid"], dtype=torch.float32).reshape(-1)
    batcher = Batcher(processor, prompt_data, grid, seconds)
    vocab = processor.tokenizer.get_vocab()
    letters = toy.LETTERS[:len(toy.ENTITY_NAMES)]
    letter_ids = torch.tensor([[vocab[x] for x in letters], [vocab["Ġ" + x] for x in letters]])
    print(f"prompt lengths: mc {len(batcher.prompts['mc'])}, caption {len(batcher.prompts['caption'])} tokens; "
          f"set-up {time.time() - started:.0f} s", flush=True)

    optimizer = torch.optim.AdamW(module.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * progress))

    def sample_item():
        index = rng.randrange(args.train)
        if rng.random() < args.caption_frac:
            return index, "caption", None
        ablate = None
        if rng.random() < args.ablate_frac:
            ablate = "video" if rng.random() < 1 - args.silent_share else "audio"
        return index, "mc", ablate

    history: dict[str, list] = {"step": [], "loss": [], "eval_step": [], "val_mc_av": [], "val_mc_a": [],
                                "val_mc_v": [], "val_caption_token": [], "elapsed_s": []}

    def evaluate(step: int) -> None:
        module.eval()
        val_feats = feats["val"]
        for run, ablate in (("av", None), ("a", "video"), ("v", "audio")):
            probs = mc_predictions(module, batcher, val_feats, ablate, letter_ids)
            history[f"val_mc_{run}"].append(float((probs.argmax(-1) == val_feats.entity).float().mean()))
        history["val_caption_token"].append(caption_token_accuracy(module, batcher, val_feats))
        history["eval_step"].append(step)
        history["elapsed_s"].append(time.time() - started)
        module.train()
        print(f"step {step}: val mc av {history['val_mc_av'][-1]:.3f} a {history['val_mc_a'][-1]:.3f} "
              f"v {history['val_mc_v'][-1]:.3f} caption-token {history['val_caption_token'][-1]:.3f} "
              f"({time.time() - started:.0f} s)", flush=True)

    module.train()
    running = None
    step, loop_started = 0, time.time()
    bar = tqdm(total=args.steps, desc="train", mininterval=10)
    while step < args.steps:
        if step == 10:
            loop_started = time.time()  # the first steps pay for warm-up: time steps 10..40
        if step == 40 and args.budget_minutes:
            per_step = (time.time() - loop_started) / 30
            evals = args.steps // args.eval_every + 1
            affordable = int(args.budget_minutes * 60 / (per_step * (1 + 8 * args.val / args.batch / args.eval_every)))
            if affordable < args.steps:
                print(f"{per_step:.3f} s/step: lowering --steps from {args.steps} to {affordable} to fit "
                      f"{args.budget_minutes} min ({evals} evaluations)", flush=True)
                args.steps = max(affordable, 41)
                bar.total = args.steps
        if step % args.eval_every == 0 and step:
            evaluate(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        data, mask, ids = batcher.build(feats["train"], [sample_item() for _ in range(args.batch)])
        loss = loss_of(module, data, mask, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        history["step"].append(step)
        history["loss"].append(loss.item())
        bar.set_postfix(loss=f"{running:.3f}")
        bar.update(1)
        step += 1
    bar.close()
    evaluate(args.steps)
    train_seconds = time.time() - started

    module.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    module.to("cpu").save_pretrained(str(out_dir), safe_serialization=True)
    processor.save_pretrained(str(out_dir))
    module.to(args.device)

    # Held-out test set: the three runs of the dominance framework and greedy captions.
    test_feats = feats["test"]
    answers, accuracy = {}, {}
    for run, ablate in (("av", None), ("a", "video"), ("v", "audio")):
        probs = mc_predictions(module, batcher, test_feats, ablate, letter_ids)
        answers[run] = probs.argmax(-1)
        accuracy[run] = float((answers[run] == test_feats.entity).float().mean())
    by_group = {}
    for group in ("audio", "video", "both"):
        keep = torch.tensor([r.identified_by == group for r in test])
        by_group[group] = {run: float((answers[run][keep] == test_feats.entity[keep]).float().mean())
                           for run in answers}
    texts = greedy_captions(module, batcher, test_feats)
    captions = caption_scores(texts, test)
    result = dict(
        command="python scripts/train_toy.py " + " ".join(sys.argv[1:] if argv is None else argv),
        args=vars(args), parameters=parameters, train_seconds=train_seconds,
        total_seconds=time.time() - started, test_mc_accuracy=accuracy, test_mc_accuracy_by_group=by_group,
        test_dominance=dominance(answers, test), test_captions=captions,
        caption_examples=[dict(id=r.id, reference=r.caption, generated=t) for r, t in list(zip(test, texts))[:8]],
    )
    stages, boundaries = [], []
    if previous is not None:
        # Earlier stages keep their summaries; the curves continue their step count.
        stages = previous.get("stages") or [{k: v for k, v in previous.items() if k != "history"}]
        old = previous["history"]
        offset = (old["step"][-1] + 1) if old["step"] else 0
        boundaries = previous.get("stage_boundaries", []) + [offset]
        merged = {key: list(old.get(key, [])) for key in history}
        for key in history:
            shift = offset if key in ("step", "eval_step") else 0
            merged[key] += [v + shift for v in history[key]]
        history = merged
    result["stages"] = stages + [dict(result)]
    result["stage_boundaries"] = boundaries
    result["history"] = history
    (out_dir / "training_log.json").write_text(json.dumps(result, indent=1))
    plot(history, args.figure, boundaries)
    print(json.dumps({k: result[k] for k in ("test_mc_accuracy", "test_mc_accuracy_by_group", "test_dominance",
                                             "test_captions", "train_seconds")}, indent=1), flush=True)
    return result


def plot(history: dict, path: str, boundaries: list[int] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    loss = np.asarray(history["loss"])
    window = 25
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid") if len(loss) > window else loss
    left.plot(history["step"], loss, alpha=0.25, label="batch loss")
    left.plot(history["step"][len(loss) - len(smooth):], smooth, label=f"mean of {window}")
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("training loss (mean token CE per example)")
    left.legend()
    for key, label in (("val_mc_av", "MC, audio + video"), ("val_mc_a", "MC, video blacked out"),
                       ("val_mc_v", "MC, audio silenced"), ("val_caption_token", "caption tokens (teacher-forced)")):
        right.plot(history["eval_step"], history[key], marker="o", label=label)
    right.axhline(0.95, color="grey", lw=0.8, ls="--")
    for axis in (left, right):
        for boundary in boundaries:
            axis.axvline(boundary, color="black", lw=0.8, ls=":")
    right.set_ylim(0, 1.02)
    right.set_xlabel("step")
    right.set_ylabel("validation accuracy")
    right.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
