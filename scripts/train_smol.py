"""Train smol-omni's audio and vision encoders on the toy world, SmolLM2 frozen (run on a GPU).

    python scripts/train_smol.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf      # the shipped run
    python scripts/train_smol.py --steps 20 --train 64 --val 16 --test 16 --out /tmp/smol --device cpu  # a smoke test

The language model (SmolLM2-135M-Instruct, dequantised from its GGUF) is frozen, so the
massive activations and attention sinks of the pretrained model are kept as they are. What
trains: Qwen2.5-Omni's audio encoder and vision encoder at a small size (their own output
projections map into SmolLM2's 576-d stream) and the embedding rows of the multimodal special
tokens added to SmolLM2's vocabulary (its own rows stay fixed: their gradient is masked).
``--lora-rank R`` additionally trains low-rank updates of every language-model projection
(merged into the weights at load), to see whether sink tokens appear among the media tokens
once the language model may adapt (docs/smol-omni.md reports what each variant gave).

Data, tasks, loss and evaluation are those of ``scripts/train_toy.py`` (the multiple-choice
task on clean clips and on the two single-modality runs, and the caption task); the
precomputed media tensors are checked against ``model.prepare`` before training. Written to
``--out``: ``media.safetensors`` (float16), ``encoders.json``, ``training_log.json``; the
curves to ``--figure``. The held-out evaluation reloads the saved (float16-rounded) weights.
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
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_toy as common  # noqa: E402  (features, batches, evaluation, curves)

from nnsight_av import toy  # noqa: E402
from nnsight_av.adapters.qwen2_5_omni import Qwen25OmniAdapter  # noqa: E402
from nnsight_av.model import AVModel  # noqa: E402
from nnsight_av.smol import model as smol  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help="SmolLM2's GGUF (default: found/fetched by nnsight_av.smol)")
    parser.add_argument("--out", default=str(smol.ASSET_DIR))
    parser.add_argument("--figure", default=str(REPO / "docs" / "smol-omni-curves.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--train-seed", type=int, default=1)
    parser.add_argument("--val-seed", type=int, default=2)
    parser.add_argument("--test-seed", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--embed-lr", type=float, default=1e-3, help="for the special-token embedding rows")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--caption-frac", type=float, default=0.35)
    parser.add_argument("--ablate-frac", type=float, default=0.5)
    parser.add_argument("--silent-share", type=float, default=0.6)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="if set, lower --steps after 40 steps so training fits this wall time (logged)")
    parser.add_argument("--audio-width", type=int, default=256)
    parser.add_argument("--audio-layers", type=int, default=4)
    parser.add_argument("--vision-width", type=int, default=256)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--mc-end", action="store_true", help="also train <|im_end|> after the letter")
    parser.add_argument("--lora-rank", type=int, default=0, help="0: the language model stays frozen")
    parser.add_argument("--lora-lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


class Batcher(common.Batcher):
    """The toy batches, with the multiple-choice target the letter alone (``mc_end=False``).

    SmolLM2 never ends a turn right after a lone letter (``<|im_end|>`` costs ~19 nats there),
    and its head is frozen: the answer is read at the first position anyway (METHOD.md section 4).
    """

    mc_end = False

    def target(self, record, task: str) -> list[int]:
        if task == "mc" and not self.mc_end:
            return self.tokenizer(record.answer, add_special_tokens=False)["input_ids"]
        return super().target(record, task)


def trainable_parameters(thinker, base_vocab: int):
    """Freeze the language model; the new embedding rows train through a gradient mask."""
    for p in thinker.model.parameters():
        p.requires_grad_(False)
    embed = thinker.model.embed_tokens.weight
    embed.requires_grad_(True)
    keep = torch.zeros(embed.shape[0], 1, device=embed.device)
    keep[base_vocab:] = 1.0
    embed.register_hook(lambda grad: grad * keep)
    encoders = [p for n, p in thinker.named_parameters() if n.startswith(("audio_tower.", "visual."))]
    return encoders, [embed]


@torch.no_grad()
def sink_probe(thinker, batcher, feats, clips: int = 20) -> dict:
    """Do media tokens carry the first token's massive activation? (Ratios to the median token.)

    Channel: the first token's largest channel at the last layer input. Per layer and clip,
    ``ratio_t = |h_t[channel]| / median over tokens``; reported: the first token's median ratio,
    and per modality the share of tokens whose ratio passes 10 and 100 at any layer from a third
    of the depth on, and the largest ratio seen.
    """
    items = [(i, "mc", None) for i in range(min(clips, len(feats.records)))]
    data, _, ids = batcher.build(feats, items, with_targets=False)
    out = thinker(**common.to_device(data, thinker.device), output_hidden_states=True)
    hidden = torch.stack(out.hidden_states[:-1]).float()                        # [L, B, T, H]
    layers = hidden.shape[0]
    channel = int(hidden[-1, :, 0].abs().mean(0).argmax())
    magnitude = hidden[..., channel].abs()[layers // 3:]                         # [L', B, T]
    ratio = (magnitude / magnitude.median(-1, keepdim=True).values.clamp(min=1e-6)).amax(0)   # [B, T]
    ids = ids.to(ratio.device)
    video = ids == batcher.tokenizer.convert_tokens_to_ids("<|VIDEO|>")
    audio = ids == batcher.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    text = ~(video | audio)
    text[:, 0] = False
    report = {"channel": channel, "first_token_ratio": float(ratio[:, 0].median())}
    for name, mask in (("video", video), ("audio", audio), ("text", text)):
        r = ratio[mask]
        report[name] = {"share_over_10": float((r > 10).float().mean()), "share_over_100": float((r > 100).float().mean()),
                        "max_ratio": float(r.max())}
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    started = time.time()
    out_dir = Path(args.out)
    if args.gguf is None:
        from nnsight_av.smol.fetch import gguf_path

        args.gguf = str(gguf_path())
    sizes = smol.EncoderSizes(audio_width=args.audio_width, audio_layers=args.audio_layers,
                              audio_heads=max(1, args.audio_width // 64), vision_width=args.vision_width,
                              vision_layers=args.vision_layers, vision_heads=max(1, args.vision_width // 64))
    language_model = smol.smol_language_model(args.gguf)
    base_vocab = language_model.config.vocab_size
    thinker, processor = smol.build_smol_thinker(args.gguf, sizes, language_model=language_model)
    del language_model
    thinker.to(args.device)
    wrapped = AVModel(thinker, adapter=Qwen25OmniAdapter, processor=processor, default_system=smol.DEFAULT_SYSTEM,
                      processor_kwargs=smol.PROCESSOR_KWARGS)
    encoders, embeddings = trainable_parameters(thinker, base_vocab)
    lora = list(smol.add_lora(thinker, args.lora_rank).values()) if args.lora_rank else []
    print(f"thinker {sum(p.numel() for p in thinker.parameters()) / 1e6:.1f} M parameters, trained "
          f"{sum(p.numel() for p in encoders) / 1e6:.2f} M (encoders) + {len(processor.tokenizer) - base_vocab} rows",
          flush=True)

    train = toy.make_dataset(args.train, seed=args.train_seed, progress=True)
    val = toy.make_dataset(args.val, seed=args.val_seed)
    test = toy.make_dataset(args.test, seed=args.test_seed, progress=True)
    feats = {name: common.Features(records, processor, name) for name, records in
             (("train", train), ("val", val), ("test", test))}
    prompt_data = {}
    for task in toy.TASKS:
        record = dataclasses.replace(val[0], task=task, prompt=toy.mc_prompt() if task == "mc" else toy.CAPTION_PROMPT)
        ex = record.prepare(wrapped)
        prompt_data[task] = ex.data
        assert torch.allclose(ex.data["pixel_values_videos"].cpu(), feats["val"].pixels[0].float(), atol=5e-3), \
            "precomputed video patches differ from the processor's"
        audio_real = ex.data["input_features"][0][:, ex.data["feature_attention_mask"][0].bool()].cpu()
        assert torch.allclose(audio_real, feats["val"].audio[0].float(), atol=5e-3), \
            "precomputed log-mel features differ from the processor's"
    for value in feats.values():
        value.to(args.device)
    grid = prompt_data["mc"]["video_grid_thw"].cpu()
    seconds = torch.as_tensor(prompt_data["mc"]["video_second_per_grid"], dtype=torch.float32).reshape(-1)
    batcher = Batcher(processor, prompt_data, grid, seconds)
    batcher.mc_end = args.mc_end
    vocab = processor.tokenizer.get_vocab()
    letters = toy.LETTERS[:len(toy.ENTITY_NAMES)]
    letter_ids = torch.tensor([[vocab[x] for x in letters], [vocab["Ġ" + x] for x in letters]])
    print(f"prompt lengths: mc {len(batcher.prompts['mc'])}, caption {len(batcher.prompts['caption'])} tokens; "
          f"set-up {time.time() - started:.0f} s", flush=True)

    optimizer = torch.optim.AdamW([
        {"params": encoders, "lr": args.lr, "weight_decay": args.weight_decay},
        {"params": embeddings, "lr": args.embed_lr, "weight_decay": 0.0},
        {"params": lora, "lr": args.lora_lr, "weight_decay": 0.0},
    ], betas=(0.9, 0.98))
    base_lrs = [args.lr, args.embed_lr, args.lora_lr]

    def lr_scale(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    def sample_item():
        index = rng.randrange(args.train)
        if rng.random() < args.caption_frac:
            return index, "caption", None
        ablate = None
        if rng.random() < args.ablate_frac:
            ablate = "video" if rng.random() < 1 - args.silent_share else "audio"
        return index, "mc", ablate

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else None
    history: dict[str, list] = {"step": [], "loss": [], "eval_step": [], "val_mc_av": [], "val_mc_a": [],
                                "val_mc_v": [], "val_caption_token": [], "elapsed_s": []}

    def forward_loss(data, mask, ids):
        if autocast is None:
            return common.loss_of(thinker, data, mask, ids)
        with autocast:
            return common.loss_of(thinker, data, mask, ids)

    def evaluate(step: int) -> None:
        thinker.eval()
        with (autocast or torch.no_grad()):
            for run, ablate in (("av", None), ("a", "video"), ("v", "audio")):
                probs = common.mc_predictions(thinker, batcher, feats["val"], ablate, letter_ids)
                history[f"val_mc_{run}"].append(float((probs.argmax(-1) == feats["val"].entity.cpu()).float().mean()))
            history["val_caption_token"].append(common.caption_token_accuracy(thinker, batcher, feats["val"]))
        history["eval_step"].append(step)
        history["elapsed_s"].append(time.time() - started)
        thinker.train()
        print(f"step {step}: val mc av {history['val_mc_av'][-1]:.3f} a {history['val_mc_a'][-1]:.3f} "
              f"v {history['val_mc_v'][-1]:.3f} caption-token {history['val_caption_token'][-1]:.3f} "
              f"({time.time() - started:.0f} s)", flush=True)

    thinker.train()
    thinker.model.eval()  # frozen: no dropout there either way, but keep it in eval mode
    running, step, loop_started = None, 0, time.time()
    bar = tqdm(total=args.steps, desc="train", mininterval=10)
    while step < args.steps:
        if step == 10:
            loop_started = time.time()
        if step == 40 and args.budget_minutes:
            per_step = (time.time() - loop_started) / 30
            affordable = int(args.budget_minutes * 60 / (per_step * 1.15))
            if affordable < args.steps:
                print(f"{per_step:.3f} s/step: lowering --steps from {args.steps} to {affordable} to fit "
                      f"{args.budget_minutes} min", flush=True)
                args.steps = max(affordable, 41)
                bar.total = args.steps
        if step % args.eval_every == 0 and step:
            evaluate(step)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * lr_scale(step)
        data, mask, ids = batcher.build(feats["train"], [sample_item() for _ in range(args.batch)])
        loss = forward_loss(data, mask, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoders + embeddings + lora, 1.0)
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

    # Save the shipped parts in float16, then evaluate what was saved.
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() for k, v in smol.trained_state(thinker, base_vocab).items()}
    save_file(state, str(out_dir / smol.WEIGHTS_FILE))
    scale = getattr(thinker, "_smol_lora_scale", 2.0)
    (out_dir / smol.SIZES_FILE).write_text(json.dumps(dict(sizes.to_dict(), lora_rank=args.lora_rank,
                                                           lora_scale=scale), indent=1))
    if lora:  # evaluate the merged model exactly as load_smol builds it
        thinker, _ = smol.build_smol_thinker(args.gguf, sizes)
        thinker.to(args.device)
    smol.apply_trained_state(thinker, {k: v.float() for k, v in load_file(str(out_dir / smol.WEIGHTS_FILE)).items()},
                             base_vocab, scale)
    thinker.eval()
    test_feats = feats["test"]
    answers, accuracy = {}, {}
    with torch.no_grad():
        for run, ablate in (("av", None), ("a", "video"), ("v", "audio")):
            probs = common.mc_predictions(thinker, batcher, test_feats, ablate, letter_ids)
            answers[run] = probs.argmax(-1)
            accuracy[run] = float((answers[run] == test_feats.entity.cpu()).float().mean())
        by_group = {}
        for group in ("audio", "video", "both"):
            keep = torch.tensor([r.identified_by == group for r in test])
            by_group[group] = {run: float((answers[run][keep] == test_feats.entity.cpu()[keep]).float().mean())
                               for run in answers}
        texts = common.greedy_captions(thinker, batcher, test_feats)
        probe = sink_probe(thinker, batcher, test_feats)
    print("sink probe:", json.dumps(probe), flush=True)
    captions = common.caption_scores(texts, test)
    result = dict(
        command="python scripts/train_smol.py " + " ".join(sys.argv[1:] if argv is None else argv),
        args=vars(args), encoder_sizes=sizes.to_dict(),
        trained_parameters=sum(p.numel() for p in encoders) + (len(processor.tokenizer) - base_vocab) * thinker.config.text_config.hidden_size,
        device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        train_seconds=train_seconds, total_seconds=time.time() - started, test_mc_accuracy=accuracy,
        test_mc_accuracy_by_group=by_group, test_dominance=common.dominance(answers, test), test_captions=captions, sink_probe=probe,
        caption_examples=[dict(id=r.id, reference=r.caption, generated=t) for r, t in list(zip(test, texts))[:12]],
        history=history,
    )
    (out_dir / "training_log.json").write_text(json.dumps(result, indent=1))
    common.plot(history, args.figure)
    print(json.dumps({k: result[k] for k in ("test_mc_accuracy", "test_mc_accuracy_by_group", "test_dominance",
                                             "test_captions", "train_seconds")}, indent=1), flush=True)
    return result


if __name__ == "__main__":
    main()
