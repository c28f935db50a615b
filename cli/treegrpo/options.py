"""The command-line arguments and options `treegrpo sample`, `eval` and `reward-server` share, as Typer annotations
(kept out of `app.py` so that it holds the commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelArg = Annotated[str, typer.Argument(help="Hub id, local diffusers folder, builtin:digits, builtin:shapes or "
                                         "builtin:shapes_edit.", metavar="MODEL")]
LoraOption = Annotated[str | None, typer.Option("--lora", help="A trained LoRA: run folder's final/, a file, "
                                                "or a hub repo id.", metavar="LORA")]
PromptOption = Annotated[list[str] | None, typer.Option("--prompt", help="A prompt (repeatable).", metavar="TEXT")]
PromptsFileOption = Annotated[Path | None, typer.Option("--prompts", metavar="FILE",
                                                       help="A prompt file, one prompt per line.")]
SourceImageOption = Annotated[Path | None, typer.Option(
    "--image", metavar="FILE", help="Editing models (FLUX.1 Kontext): the source image to edit, for every prompt "
    "whose .jsonl line names none.")]
AutoResizeOption = Annotated[bool | None, typer.Option(
    "--auto-resize/--keep-size", help="Editing models: resize the source to the family's preferred resolution "
    "nearest its aspect ratio, as the stock pipeline does (Kontext: 672-1568 px), or keep its size (default: "
    "the shipped model's setting, else resize).")]
StepsOption = Annotated[int | None, typer.Option("--steps", metavar="N",
                                                 help="Denoising steps (default: the model's).")]
GuidanceOption = Annotated[float | None, typer.Option("--guidance", metavar="SCALE",
                                                     help="Guidance scale (default: the model's).")]
SizeOption = Annotated[int | None, typer.Option(help="Image size in pixels (default: the model's).", metavar="PIXELS")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed; the same seed gives paired samples.", metavar="N")]
DtypeOption = Annotated[str, typer.Option("--dtype", help="Weights and compute dtype: fp32, bf16 or fp16 (bf16 halves "
                                          "the memory of FLUX / SD3.5).", metavar="fp32|bf16|fp16")]


BestOfTreeOption = Annotated[bool, typer.Option("--best-of-tree", help="Sample a TreeGRPO tree per prompt and keep "
                                                "the leaf the --reward scores highest.")]
ScorerOption = Annotated[str | None, typer.Option("--reward", help="Scorer for --best-of-tree: kind or kind:key=value,"
                                                  "... (e.g. pickscore:scale=raw).", metavar="KIND[:KEY=VALUE,...]")]
BranchFactorOption = Annotated[str, typer.Option(help="k of the tree, or the children per window step, e.g. 9,3 (the "
                                                 "digits recipe's shape).", metavar="K|K1,K2,...")]
WindowWidthOption = Annotated[int | None, typer.Option(min=1, help="w of the tree (default: 3, or the length of a "
                                                       "--branch-factor list).", metavar="W")]
WindowStartOption = Annotated[int | None, typer.Option(metavar="S", help="s of the tree (default: drawn from Eq. 7).")]
BeamOption = Annotated[int | None, typer.Option(min=1, help="Pruned tree search: keep this many nodes per prompt at "
                                                "each window depth.", metavar="N")]
TailStepsOption = Annotated[int | None, typer.Option(min=1, help="Best-of-tree: integrate each leaf's ODE tail after "
                                                     "the window with this many DPM-Solver++ steps (fewer denoiser "
                                                     "rows; default: one per timestep).", metavar="N")]
ServerDevicesOption = Annotated[str | None, typer.Option(
    "--devices", metavar="DEV[,DEV...]", help="One reward model per device, e.g. cuda:0,cuda:1 (default: the first "
    "GPU, else the CPU); concurrent requests are spread over them.")]
ServerBackendOption = Annotated[str, typer.Option(
    "--backend", metavar="auto|uvicorn|stdlib", help="uvicorn (pip install \"treegrpo[server]\"): an event loop, "
    "for many or slow clients; stdlib: no dependency, a thread per connection; auto: uvicorn when installed.")]
ServerBodyOption = Annotated[int, typer.Option(
    "--max-body-mb", min=1, metavar="MB", help="Largest request body in MiB (413 beyond); a JSON body costs about "
    "3.6x its size in memory while it is parsed.")]
ServerBatchOption = Annotated[int, typer.Option(
    "--max-batch", min=1, metavar="N", help="Most images scored in one reward call: concurrent requests are batched "
    "together up to this.")]
