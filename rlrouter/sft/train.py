"""SFT stage: fine-tune the router LLM on synthesized conversations with TRL's SFTTrainer.

The loss covers only the router's own turns (``assistant_only_loss``: the chat template
marks each assistant turn, its ``<|im_end|>`` included, with ``{% generation %}``); the
system prompt and the environment's turns are context. Metrics go to ``metrics.jsonl`` in
the run folder (and TensorBoard when it is installed). The result is an rlrouter
checkpoint (``checkpoints/README.md``) with ``trainer_state/`` for exact resume.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from rlrouter.router.model import default_device


@dataclass
class SFTSettings:
    """Recipe ``sft:`` section.

    Attributes:
        epochs: passes over the synthesized dataset.
        learning_rate: peak learning rate (linear decay, warmup_ratio of the steps).
        warmup_ratio: share of steps spent warming up.
        batch_size / grad_accum: per-step batch and gradient accumulation.
        max_length: longest conversation in tokens (longer ones are truncated).
        lora: train LoRA adapters (peft) instead of all weights; merged before saving.
        lora_r / lora_alpha: LoRA rank and scale.
        logging_steps: steps between metric lines.
        gradient_checkpointing: recompute activations in the backward pass (less memory for
            a large base on a GPU, about 20% slower); off by default.
        out_dir: checkpoint directory (default ``runs/<name>/sft``).
    """

    epochs: float = 3.0
    learning_rate: float = 2e-3
    warmup_ratio: float = 0.05
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 4096
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    logging_steps: int = 10
    gradient_checkpointing: bool = False
    out_dir: str | None = None


class JsonlMetrics(TrainerCallback):
    """Appends every log line of the trainer to a JSONL file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            line = {"step": state.global_step, "epoch": state.epoch,
                    "elapsed_s": round(time.perf_counter() - self.start, 2), **logs}
            with self.path.open("a") as handle:
                handle.write(json.dumps(line) + "\n")


def _report_to() -> list[str]:
    try:
        import tensorboard  # noqa: F401

        return ["tensorboard"]
    except ImportError:
        return []


def sft_config(settings: SFTSettings, work: str | Path, seed: int = 0, progress: bool = True):
    """TRL's ``SFTConfig`` for the SFT stage. Precision and memory are set, not left to TRL's
    defaults: those are bf16 autocast and gradient checkpointing, which on a CPU made every
    step of SmolLM2-135M 3.8x slower (bf16 matmuls have no fast path on most CPUs;
    ``benchmarks/sft_speed.py``) and trained the router in another precision than the one
    it routes in. bf16 is used on a GPU that supports it; gradient checkpointing only when
    ``settings.gradient_checkpointing`` asks for it."""
    import torch
    from trl import SFTConfig

    device = default_device()
    return SFTConfig(
        output_dir=str(work),
        num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=settings.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_length=settings.max_length,
        assistant_only_loss=True,
        packing=False,
        logging_steps=settings.logging_steps,
        save_strategy="epoch",
        save_total_limit=1,
        report_to=_report_to(),
        seed=seed,
        data_seed=seed,
        use_cpu=device == "cpu",
        bf16=device == "cuda" and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=settings.gradient_checkpointing,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )


def run_sft(model, tokenizer, dataset, settings: SFTSettings, out_dir: str | Path, meta: dict, seed: int = 0,
            resume_from: str | Path | None = None, progress: bool = True) -> Path:
    """Train ``model`` on ``dataset["messages"]`` and write a checkpoint to ``out_dir``."""
    from trl import SFTTrainer

    from rlrouter.router.checkpoint import save_checkpoint

    out_dir = Path(out_dir)
    work = Path(tempfile.mkdtemp(prefix="rlrouter-sft-"))
    metrics = JsonlMetrics(out_dir.parent / f"{out_dir.name}-metrics.jsonl")
    args = sft_config(settings, work, seed, progress)
    peft_config = None
    if settings.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset.select_columns(["messages"]),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[metrics])
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    trained = trainer.model
    if settings.lora:
        trained = trained.merge_and_unload()  # a plain HF model that vLLM loads as is
    last = sorted(work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = [h for h in trainer.state.log_history if "loss" in h]
    summary = {
        "stage": "sft",
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "final_logged_loss": history[-1]["loss"] if history else None,
        "examples": len(dataset),
        "seconds": result.metrics.get("train_runtime"),
    }
    meta = {**meta, "training": {**meta.get("training", {}), **summary}}
    path = save_checkpoint(trained, tokenizer, out_dir, meta, extra_dirs={"trainer_state": last[-1] if last else None})
    return path

