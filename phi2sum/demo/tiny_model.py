"""The tiny Phi behind `embedded:tiny-phi`: tokenizer, model, short pre-training, and its cached build.

Why: the project must run end to end offline on a CPU, without downloading microsoft/phi-2. The model is a
tiny randomly initialised `PhiForCausalLM` (the same architecture as Phi-2, so every code path - 4-bit
loading, LoRA on q_proj/k_proj/v_proj/dense, generation - is the real one) with a byte-level BPE tokenizer
trained on the synthetic corpus. The base gets a short plain-text pre-training on the train split
(documents and summaries as separate sequences, never in the prompt format), so it knows the language of
the corpus but not the article -> summary task; fine-tuning then has something to adapt.

It is built once per machine into a cache folder named after a hash of RECIPE and the corpus text (see
`phi2sum.demo.cache` for how concurrent callers share one build).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path

from phi2sum.demo.cache import cached_build, is_cached
from phi2sum.demo.corpus import corpus_texts, synthetic_records
from phi2sum.errors import TrainingError

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:tiny-phi"

EOS_TOKEN = "<|endoftext|>"  # Phi-2's single special token: bos, eos and unk at once.
BUILD_INFO_FILE = "phi2sum_build.json"  # written last inside the build; its presence marks a complete build.
CACHE_NAME = "tiny-phi"  # the cache folder is tiny-phi-<recipe hash>

# Everything that decides the built model. Its hash (with the corpus text) names the cache folder.
RECIPE = {
    "recipe_version": 1,
    "tokenizer": {"type": "byte-level-bpe", "vocab_size": 2000, "min_frequency": 2},
    "model": {
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "partial_rotary_factor": 0.4,  # as in Phi-2
        "hidden_act": "gelu_new",
        "seed": 1234,
    },
    "pretrain": {
        "steps": 250,
        "doc_batch_size": 12,
        "summary_batch_size": 48,
        "learning_rate": 3e-3,
        "warmup_steps": 12,
        "weight_decay": 0.01,
        "max_length": 256,
        "seed": 4321,
        "log_every": 20,
    },
}


def train_tokenizer(texts: list[str]):
    """A byte-level BPE like Phi-2's (no unknown bytes), small enough that the embedding stays tiny."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    cfg = RECIPE["tokenizer"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg["vocab_size"],
        min_frequency=cfg["min_frequency"],
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=RECIPE["model"]["max_position_embeddings"],
    )


def _new_model(vocab_size: int, eos_id: int):
    """A randomly initialised Phi shrunk to ~1M parameters; seeded so a rebuild gives the same start."""
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    cfg = RECIPE["model"]
    config = PhiConfig(
        vocab_size=vocab_size,
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        max_position_embeddings=cfg["max_position_embeddings"],
        hidden_act=cfg["hidden_act"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": cfg["partial_rotary_factor"]},
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg["seed"])
    return PhiForCausalLM(config)


def _batches(tokenizer, texts: list[str], batch_size: int, max_length: int):
    """Right-padded batches of single sequences (text + EOS); padding is masked out of the loss."""
    import torch

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][: max_length - 1] + [tokenizer.eos_token_id]
           for t in texts]
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(x) for x in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.eos_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, x in enumerate(chunk):
            input_ids[row, :len(x)] = torch.tensor(x)
            mask[row, :len(x)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return out


def _schedule(tokenizer, records: list[dict], rng: random.Random) -> list[dict]:
    """One epoch of batches: documents and summaries in separate batches (similar token counts, little
    padding), each text its own sequence so the model never sees an article next to its summary."""
    cfg = RECIPE["pretrain"]
    docs = [r["document"] for r in records]
    sums = [r["summary"] for r in records]
    rng.shuffle(docs)
    rng.shuffle(sums)
    batches = (_batches(tokenizer, docs, cfg["doc_batch_size"], cfg["max_length"])
               + _batches(tokenizer, sums, cfg["summary_batch_size"], cfg["max_length"]))
    rng.shuffle(batches)
    return batches


def _mean_loss(model, batches: list[dict]) -> float:
    """Per-token loss over `batches` (weighted by their token counts, padding excluded): a number that
    compares models fairly however the texts were batched."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(model(**b).loss) * n
            count += n
    return total / count


def _pretrain(model, tokenizer) -> dict:
    """A short full-parameter causal-LM pre-training on the train split as plain text, so the base knows
    the corpus language (names, story phrasing) but has never seen the article -> summary prompt."""
    import torch
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    cfg = RECIPE["pretrain"]
    rng = random.Random(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    train = synthetic_records("train")
    val_batches = _batches(tokenizer, corpus_texts(("validation",)), cfg["doc_batch_size"], cfg["max_length"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg["learning_rate"])
    steps, warmup = cfg["steps"], cfg["warmup_steps"]

    def lr_factor(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_factor)
    queue: list[dict] = []
    losses: list[float] = []
    model.train()
    with logging_redirect_tqdm(), tqdm(range(steps), desc="pre-training tiny-phi", unit="step") as bar:
        for step in bar:
            if not queue:
                queue = _schedule(tokenizer, train, rng)
            loss = model(**queue.pop()).loss
            value = loss.detach().item()
            if not math.isfinite(value):
                raise TrainingError(f"tiny-phi pre-training diverged at step {step + 1} (loss {value}); "
                                    "RECIPE in phi2sum/demo/tiny_model.py needs a lower learning rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            losses.append(value)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if (step + 1) % cfg["log_every"] == 0 or step == 0:
                logger.info("tiny-phi pre-training step %d/%d: loss %.3f", step + 1, steps, losses[-1])
    tail = losses[-10:]
    return {
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),  # mean of the last steps: one batch alone is noisy
        "validation_loss": _mean_loss(model, val_batches),
        "steps": steps,
    }


def _build(dest: Path) -> dict:
    """Build tokenizer and pre-trained model into `dest`; returns the build info, which the cache writes
    last as BUILD_INFO_FILE (the marker of a complete build)."""
    import torch

    started = time.monotonic()
    threads = torch.get_num_threads()
    # One thread: the matrices are tiny, and on a shared 2-core machine two OpenMP threads competing with
    # other processes run several times slower than one (measured 0.7 vs 3.7 steps/s under load).
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state untouched
            tokenizer = train_tokenizer(corpus_texts())
            tokenizer.save_pretrained(dest)
            model = _new_model(len(tokenizer), tokenizer.eos_token_id)
            stats = _pretrain(model, tokenizer)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(dest)
    return {
        "model": EMBEDDED_MODEL,
        "recipe_hash": recipe_hash(),
        "recipe": RECIPE,
        "vocab_size": len(tokenizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        **stats,
        "build_seconds": round(time.monotonic() - started, 1),
    }


def recipe_hash() -> str:
    """Hash of the build recipe and the exact corpus text: either changing means a different model."""
    h = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    for text in corpus_texts():
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def cache_root(cache_dir: str | None = None) -> Path:
    """Where built models live: `cache_dir`, else $PHI2SUM_CACHE, else ~/.cache/phi2sum."""
    root = cache_dir or os.environ.get("PHI2SUM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "phi2sum")
    return Path(root)


def is_built(cache_dir: str | None = None) -> bool:
    """Whether the tiny model for the current recipe is already built on this machine (never builds it):
    callers that only want it when it is cheap, like a report, ask this first."""
    return is_cached(cache_root(cache_dir), CACHE_NAME, recipe_hash(), BUILD_INFO_FILE)


def tiny_model_path(cache_dir: str | None = None) -> str:
    """Local folder holding the tiny Phi and its tokenizer, building it the first time.

    Looked up under `cache_root(cache_dir)` in a folder named after the recipe hash. Several processes may
    call this at once: one builds while the others wait on a file lock and then reuse its result.
    """
    folder = cached_build(cache_root(cache_dir), CACHE_NAME, recipe_hash(), _build, marker=BUILD_INFO_FILE)
    return str(folder)
