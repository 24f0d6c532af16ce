"""Engine throughput on random weights: the seed-style baseline against larger batches, same images.

    python benchmarks/engine.py --model v15 --device cuda --max-num 6 9 12 40 --json PATH   # on an H200
    python benchmarks/engine.py --smoke                                                     # CPU, tiny model

`v15` builds transformers' native InternVL at InternVL-Chat-V1.5's exact shapes (InternViT-6B 448px, 45
layers; InternLM2-20B as Llama, 48 layers, GQA 48/8) through `vlm_hpc.internvl.weight_mapping.native_config`, and
initialises it on the device in bf16: no download. Prompts have the real structure (BOS, ~220 text tokens
standing for the system message and the seed's question, 256 image tokens per tile); images are drawn from
typical web sizes and tiled with the real `tile_count`. Every row generates exactly `--new-tokens` tokens
(EOS ignored) so runs compare. The baseline is the seed's: a fixed batch of 6 images in row order, one
generate() call per batch. "ours" forms batches as the worker does (`vlm_hpc.run.batching`: windows of rows sorted
by tile count, filled to a tile budget, `auto` = sized to the free GPU memory) and encodes images in vision
micro-batches; both go through the engine's own `generate_new_tokens`. Each configuration reports images/s,
tiles/s, tokens/s, achieved TFLOP/s (estimated from parameter counts), its fraction of `--peak-tflops`, and
peak GPU memory.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig, InternVLForConditionalGeneration

from harness import Stopwatch, machine_info, run_info, write_results
from vlm_hpc.engines.transformers import generate_new_tokens, memory_costs
from vlm_hpc.internvl.weight_mapping import native_config, num_image_token
from vlm_hpc.preprocess.tiling import tile_count
from vlm_hpc.run.batching import BatchLimits, BatchPlanner, memory_tile_budget, split_windows
from vlm_hpc.tiny_model import original_config

# A web-like size mix (width, height): small, typical, HD, 4K, extreme aspect ratios.
SIZES = [(640, 480), (800, 600), (1024, 768), (500, 750), (1280, 720), (1920, 1080), (1080, 1920), (3840, 2160),
         (1000, 1000), (448, 448), (2400, 300), (600, 4000), (1600, 1200), (320, 240)]
TEXT_TOKENS = 220  # system message + the seed's question, roughly, in InternLM2 tokens
V15_IMAGE_TOKEN = 92546


def v15_original_config() -> dict:
    """InternVL-Chat-V1.5's architecture in the original config format (sizes from the released config)."""
    config = original_config()
    config["vision_config"].update(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25,
                                   intermediate_size=12800)
    config["llm_config"].update(hidden_size=6144, num_hidden_layers=48, num_attention_heads=48,
                                num_key_value_heads=8, intermediate_size=16384, vocab_size=92553,
                                rope_scaling={"type": "dynamic", "factor": 2.0})
    return config


def build_model(kind: str, device: str, dtype: torch.dtype) -> tuple[InternVLForConditionalGeneration, int, dict]:
    original = v15_original_config() if kind == "v15" else original_config()
    image_token = V15_IMAGE_TOKEN if kind == "v15" else 506
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(native_config(original, image_token))
    model.set_attn_implementation("sdpa")
    model.to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            elif parameter.dim() == 1 and ("norm" in name or "lambda" in name):
                parameter.fill_(1.0 if "norm" in name else 0.1)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
        rotary = model.model.language_model.rotary_emb
        fresh = type(rotary)(rotary.config)
        rotary.inv_freq, rotary.original_inv_freq = fresh.inv_freq.to(device), fresh.original_inv_freq.to(device)
    model.eval()
    return model, image_token, original


def parameter_counts(model: InternVLForConditionalGeneration) -> dict[str, int]:
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    llm = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    llm -= model.model.language_model.embed_tokens.weight.numel()  # a lookup, not a matmul
    return {"vision": vision, "llm": llm}


def make_workload(count: int, max_num: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [tile_count(*rng.choice(SIZES), max_num) for _ in range(count)]


def plan(workload: list[int], limits: BatchLimits, window: int) -> list[list[int]]:
    """Batches of workload positions as the worker forms them: windows of rows through a BatchPlanner."""
    planner = BatchPlanner(limits, workload.__getitem__)
    batches = []
    for rows in split_windows(list(range(len(workload))), limits, window):
        batches += planner.add(rows)
    return batches + planner.flush()


def run_batches(model, image_token: int, workload: list[int], batches: list[list[int]], new_tokens: int,
                per_tile: int, device: str, vision_batch: int | None) -> dict:
    """Caption the workload batch by batch through the engine's generate path; returns the timings."""
    generated = 0
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=2, eos_token_id=None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    watch = Stopwatch()
    for batch in batches:
        counts = [workload[i] for i in batch]
        lengths = [1 + TEXT_TOKENS + 2 + per_tile * n for n in counts]
        width = max(lengths)
        input_ids = torch.full((len(counts), width), 2, dtype=torch.long)
        attention = torch.zeros((len(counts), width), dtype=torch.long)
        for row, (n, length) in enumerate(zip(counts, lengths)):
            prompt = [1] + [300] * (TEXT_TOKENS // 2) + [image_token - 2] + [image_token] * (per_tile * n) \
                + [image_token - 1] + [301] * (TEXT_TOKENS - TEXT_TOKENS // 2)
            input_ids[row, width - length:] = torch.tensor(prompt)
            attention[row, width - length:] = 1
        uint8 = torch.randint(0, 256, (sum(counts), 3, 448, 448), dtype=torch.uint8)
        if device.startswith("cuda"):
            uint8 = uint8.pin_memory()
        with torch.inference_mode():
            output = generate_new_tokens(model, input_ids, attention, uint8.to(device, non_blocking=True), config,
                                         vision_batch=vision_batch)
        generated += output.shape[1] * len(counts)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = watch.wall_s()
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"seconds": seconds, "tokens": generated, "peak_gib": memory, "batches": len(batches)}


def auto_budget(model, per_tile: int, new_tokens: int, max_images: int, max_num: int, vision_batch: int,
                device: str) -> int:
    """The worker's tile_budget: auto for this model on this device."""
    if not device.startswith("cuda"):
        return max_images * (max_num + 1)
    costs = memory_costs(model, per_tile, TEXT_TOKENS + 3, new_tokens, vision_batch)
    return memory_tile_budget(torch.cuda.mem_get_info()[0], costs.tile_bytes, costs.image_bytes,
                              costs.vision_workspace_bytes, max_images, max_num + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("v15", "tiny"), default="v15")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-num", type=int, nargs="+", default=[6, 9, 12, 40])
    parser.add_argument("--images", type=int, default=96, help="images per configuration")
    parser.add_argument("--new-tokens", type=int, default=168)
    parser.add_argument("--baseline-batch", type=int, default=6, help="the seed's fixed batch")
    parser.add_argument("--tile-budgets", nargs="+", default=["auto"],
                        help="ours: tile budgets to try (numbers or auto), images sorted by tile count")
    parser.add_argument("--max-images", type=int, default=64, help="ours: generation.batch_size")
    parser.add_argument("--sort-window", type=int, default=64, help="ours: generation.sort_window")
    parser.add_argument("--vision-batch", type=int, default=64, help="ours: generation.vision_batch")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 peak measured on an H200")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, a few images: keeps CI honest")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.max_num, args.images, args.new_tokens = "tiny", "cpu", [1, 6], 6, 4
        args.tile_budgets, args.max_images, args.sort_window, args.vision_batch = ["12", "auto"], 4, 3, 5
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, image_token, original = build_model(args.model, args.device, dtype)
    counts = parameter_counts(model)
    per_tile = num_image_token(original)
    vision_tokens = (448 // 14) ** 2 + 1
    results = []
    print(f"{'max_num':>7} {'run':>14} {'batches':>7} {'img/s':>7} {'tiles/s':>8} {'tok/s':>8} {'TFLOP/s':>8} "
          f"{'peak%':>6} {'GiB':>6} {'vs base':>7}")
    for max_num in args.max_num:
        workload = make_workload(args.images, max_num, seed=max_num)
        runs = [("seed", BatchLimits(args.baseline_batch), None)]
        for budget in args.tile_budgets:
            tiles = auto_budget(model, per_tile, args.new_tokens, args.max_images, max_num, args.vision_batch,
                                args.device) if budget == "auto" else int(budget)
            runs.append((f"ours-{budget}" + (f"={tiles}" if budget == "auto" else ""),
                         BatchLimits(args.max_images, tiles), args.vision_batch))
        baseline = None
        for name, limits, vision_batch in runs:
            batches = plan(workload, limits, args.sort_window)
            timing = run_batches(model, image_token, workload, batches, args.new_tokens, per_tile, args.device,
                                 vision_batch)
            tiles = sum(workload)
            prompt_tokens = sum(1 + TEXT_TOKENS + 2 + per_tile * n for n in workload)
            flops = 2 * (counts["vision"] * vision_tokens * tiles + counts["llm"] * (prompt_tokens + timing["tokens"]))
            images_per_s = len(workload) / timing["seconds"]
            baseline = baseline or images_per_s
            row = {"max_num": max_num, "run": name, "max_images": limits.max_images, "tile_budget": limits.max_tiles,
                   "batches": timing["batches"], "images": len(workload), "tiles": tiles,
                   "images_per_s": images_per_s, "tiles_per_s": tiles / timing["seconds"],
                   "tokens_per_s": timing["tokens"] / timing["seconds"], "tflops": flops / timing["seconds"] / 1e12,
                   "peak_fraction": flops / timing["seconds"] / 1e12 / args.peak_tflops,
                   "peak_gib": timing["peak_gib"], "speedup_vs_baseline": images_per_s / baseline}
            results.append(row)
            print(f"{max_num:>7} {name:>14} {row['batches']:>7} {row['images_per_s']:>7.3f} {row['tiles_per_s']:>8.2f} "
                  f"{row['tokens_per_s']:>8.1f} {row['tflops']:>8.2f} {100 * row['peak_fraction']:>5.1f}% "
                  f"{row['peak_gib'] or 0:>6.1f} {row['speedup_vs_baseline']:>6.2f}x", flush=True)
    if args.json:
        gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None
        write_results(args.json, {**run_info(), "machine": machine_info(transformers=transformers.__version__, gpu=gpu),
                                  "args": vars(args) | {"json": str(args.json)}, "parameters": counts,
                                  "results": results}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
