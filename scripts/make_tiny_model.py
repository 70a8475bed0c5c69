"""Train the tiny Qwen3 model that asyncllm ships, so `asyncllm generate` works with no download.

Everything is made here, offline and deterministically: a procedural corpus of children's stories
and of chats that ask for them (scripts/tiny_corpus.py), a byte-level BPE tokenizer with a
Qwen-style chat format (<|im_start|>role ... <|im_end|>) and its chat template, and a small
Qwen3ForCausalLM trained on one CPU thread. Plain text continues as a story and stops at
<|endoftext|>; a chat rendered with the template gets a story as the assistant's answer,
ended by <|im_end|>.

    python scripts/make_tiny_model.py              # (re)write src/asyncllm/assets/tiny-qwen3
    python scripts/make_tiny_model.py --check      # retrain in a temp dir, compare SHA-256 of files
    python scripts/make_tiny_model.py --out /tmp/m --steps 100   # quick experiment
    python scripts/make_tiny_model.py --checkpoint /tmp/ckpt.pt  # a killed run resumes here
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before tokenizers is imported

import torch
from tiny_corpus import Message, make_documents
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "src" / "asyncllm" / "assets" / "tiny-qwen3"
EOS = "<|endoftext|>"  # ends a plain document
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # open and close one chat message
SEED = 1234
NUM_DOCUMENTS = 40_000
CHAT_SHARE = 0.5  # of the documents; the rest are plain stories
VOCAB_SIZE = 1024
SEQ_LEN = 512  # long enough for a whole chat, so "make it shorter" sees the story it shortens
BATCH_SIZE = 4
DEFAULT_STEPS = 2400
PEAK_LR = 3e-3
CHECKPOINT_EVERY = 100  # steps, with --checkpoint
PROMPTS = ("Once upon a time", "The little dog", "One day")
SAMPLE_CHATS = (
    [Message("user", "Tell me a story.")],
    [
        Message("system", "You are a helpful assistant."),
        Message("user", "Tell me a story about a brave fox named Leo."),
    ],
)
# Jinja, rendered by transformers' apply_chat_template. Content may be a string or a list of
# OpenAI-style parts ({"type": "text", "text": ...}); other roles are an error, not ignored.
CHAT_TEMPLATE = """\
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('tiny-qwen3 chats have the roles system, user and assistant, not '
            + message['role']) }}
    {%- endif %}
    {%- if message['content'] is not defined %}
        {%- set content = '' %}
    {%- elif message['content'] is string %}
        {%- set content = message['content'] %}
    {%- else %}
        {%- set content = message['content'] | selectattr('type', 'equalto', 'text')
            | map(attribute='text') | join('') %}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


class Segment(NamedTuple):
    """A piece of a training document, and whether the model learns to write it."""

    text: str
    trained: bool


class TokenStream(NamedTuple):
    """All documents, tokenized and concatenated."""

    ids: torch.Tensor  # token ids
    trained: torch.Tensor  # bool per token: is it a target of the loss
    starts: torch.Tensor  # where each document begins


def chat_segments(messages: list[Message]) -> list[Segment]:
    """A chat as CHAT_TEMPLATE renders it, cut so that special tokens stand alone.

    Only the assistant's words and its <|im_end|> are trained: the model should answer, not
    predict what a user will ask.
    """
    segments = []
    for message in messages:
        answer = message.role == "assistant"
        segments += [
            Segment(IM_START, False),
            Segment(f"{message.role}\n", False),
            Segment(message.content, answer),
            Segment(IM_END, answer),
            Segment("\n", False),
        ]
    return segments


def document_segments(document: str | list[Message]) -> list[Segment]:
    """A plain story (trained whole, <|endoftext|> included) or a chat, then <|endoftext|>."""
    if isinstance(document, str):
        return [Segment(document, True), Segment(EOS, True)]
    return [*chat_segments(document), Segment(EOS, False)]


def train_tokenizer(segments: list[Segment]) -> Tokenizer:
    """Byte-level BPE: every byte is in the vocabulary, so any UTF-8 text round-trips."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [EOS, IM_START, IM_END]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # The trainer would learn merges inside "<|im_end|>" if it saw it: give it plain text only.
    texts = (s.text for s in segments if s.text not in specials)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def tokenize(tokenizer: Tokenizer, documents: list[list[Segment]]) -> TokenStream:
    """Encode every segment; ids and trained flags in one stream, and document starts.

    Segments are cut at special tokens and before "\\n"-led text, where the byte-level
    pre-tokenizer splits anyway, so their encodings join into the encoding of the whole text.
    """
    flat = [segment for document in documents for segment in document]
    encodings = tokenizer.encode_batch([s.text for s in flat], add_special_tokens=False)
    ids: list[int] = []
    trained: list[bool] = []
    starts: list[int] = []
    position = 0
    for document in documents:
        starts.append(len(ids))
        for segment in document:
            piece = encodings[position].ids
            position += 1
            ids += piece
            trained += [segment.trained] * len(piece)
    return TokenStream(
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(trained, dtype=torch.bool),
        torch.tensor(starts, dtype=torch.long),
    )


def check_segments_join(tokenizer: Tokenizer, documents: list[list[Segment]]) -> None:
    """Fail unless the pieces tokenize like the whole text (what inference will see)."""
    for document in documents:
        joined = tokenizer.encode("".join(s.text for s in document)).ids
        pieces = [i for s in document for i in tokenizer.encode(s.text).ids]
        if joined != pieces:
            raise RuntimeError(f"segments tokenize differently from the text: {document!r}")


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """Write tokenizer.json plus the config that makes AutoTokenizer load it without changes.

    The chat template goes in tokenizer_config.json, which every transformers version (and
    most other servers) read; newer ones also accept a separate chat_template.jinja.
    """
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": EOS,
        "bos_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def check_chat_template(out: Path, chats: list[list[Message]]) -> None:
    """Fail unless transformers renders the saved template exactly as the model was trained."""
    tokenizer = AutoTokenizer.from_pretrained(out)
    for messages in chats:
        rendered = tokenizer.apply_chat_template([m._asdict() for m in messages], tokenize=False)
        if rendered != "".join(s.text for s in chat_segments(messages)):
            raise RuntimeError(f"chat template renders differently from training: {rendered!r}")


def model_config(vocab_size: int, eos_id: int) -> Qwen3Config:
    """Small enough to train in minutes on two cores; GQA and tied embeddings like real Qwen3."""
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        bos_token_id=None,
        pad_token_id=eos_id,
        architectures=["Qwen3ForCausalLM"],
    )


def learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return PEAK_LR * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return PEAK_LR * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def batches(stream: TokenStream, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Input ids and labels for every step: windows that begin where a document begins.

    Inference always starts a prompt at position 0 (a chat with <|im_start|>), so training
    does too; a window runs on into the next documents. Untrained tokens get label -100.
    """
    generator = torch.Generator().manual_seed(SEED)
    starts = stream.starts[stream.starts <= len(stream.ids) - SEQ_LEN]
    picks = torch.randint(0, len(starts), (steps, BATCH_SIZE), generator=generator)
    for row_picks in picks:
        windows = [slice(s, s + SEQ_LEN) for s in starts[row_picks].tolist()]
        ids = torch.stack([stream.ids[w] for w in windows])
        trained = torch.stack([stream.trained[w] for w in windows])
        yield ids, ids.masked_fill(~trained, -100)


def recipe_digest() -> str:
    """SHA-256 of this script and the corpus: a checkpoint resumes only the same recipe."""
    digest = hashlib.sha256()
    for name in ("make_tiny_model.py", "tiny_corpus.py"):
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


def resume(
    model: Qwen3ForCausalLM, optimizer: torch.optim.Optimizer, checkpoint: Path | None, steps: int
) -> tuple[int, list[float]]:
    """Load a checkpoint of this recipe if there is one; the step to go on from, recent losses."""
    if checkpoint is None or not checkpoint.exists():
        return 0, []
    state = torch.load(checkpoint, weights_only=True)
    if state["recipe"] != recipe_digest() or state["steps"] != steps:
        raise SystemExit(f"{checkpoint} is from another recipe or step count; delete it")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    print(f"resuming from {checkpoint} at step {state['step']}")
    return int(state["step"]), list(state["recent"])


def save_checkpoint(
    path: Path, model: Qwen3ForCausalLM, optimizer: torch.optim.Optimizer, step: int,
    steps: int, recent: list[float],
) -> None:  # fmt: skip
    """Everything training needs to go on from `step` bit for bit, written atomically."""
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
        "steps": steps, "recent": recent, "recipe": recipe_digest(),
    }  # fmt: skip
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    partial.replace(path)


def train(
    model: Qwen3ForCausalLM, stream: TokenStream, steps: int, checkpoint: Path | None = None
) -> float:
    """Train on windows of the token stream; returns the mean loss of the last 50 steps.

    With `checkpoint`, the state is saved there every CHECKPOINT_EVERY steps and a killed run
    goes on from it; the weights come out the same as from an unbroken run.
    """
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=PEAK_LR, weight_decay=0.1, betas=(0.9, 0.95)
    )
    model.train()
    first, recent = resume(model, optimizer, checkpoint, steps)
    start = time.monotonic()
    for step, (ids, labels) in enumerate(batches(stream, steps)):
        if step < first:
            continue  # the batches are drawn all the same, so the later ones do not change
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        # The model shifts labels by one itself.
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = [*recent[-49:], loss.item()]
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.monotonic() - start:6.1f}s")
        if checkpoint is not None and (step + 1) % CHECKPOINT_EVERY == 0:
            save_checkpoint(checkpoint, model, optimizer, step + 1, steps, recent)
    return sum(recent) / len(recent)


def build(out: Path, steps: int, checkpoint: Path | None = None) -> None:
    """Make corpus, tokenizer and model, and write them all to `out`."""
    random.seed(SEED)
    torch.manual_seed(SEED)
    # One thread: float sums happen in one order whatever the machine's core count, and on a
    # busy machine one thread beats several that wait for each other at every barrier.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    documents = make_documents(NUM_DOCUMENTS, CHAT_SHARE, SEED)
    segmented = [document_segments(d) for d in documents]
    tokenizer = train_tokenizer([s for document in segmented for s in document])
    check_segments_join(tokenizer, segmented[:200])
    stream = tokenize(tokenizer, segmented)
    vocab_size = tokenizer.get_vocab_size()
    chats = [d for d in documents if not isinstance(d, str)]
    print(f"corpus: {len(documents) - len(chats)} stories, {len(chats)} chats, ", end="")
    print(f"{len(stream.ids)} tokens ({int(stream.trained.sum())} trained), vocab {vocab_size}")
    eos_id, im_end_id = tokenizer.token_to_id(EOS), tokenizer.token_to_id(IM_END)
    model = Qwen3ForCausalLM(model_config(vocab_size, eos_id)).float()
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters")
    start = time.monotonic()
    final_loss = train(model, stream, steps, checkpoint)
    print(f"trained {steps} steps in {time.monotonic() - start:.0f}s, final loss {final_loss:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    # Either token ends a generation: <|endoftext|> a plain story, <|im_end|> a chat answer.
    GenerationConfig(
        eos_token_id=[eos_id, im_end_id], pad_token_id=eos_id, do_sample=False
    ).save_pretrained(out)
    save_tokenizer(tokenizer, out)
    check_chat_template(out, chats[:200])
    for path in out.iterdir():
        path.chmod(0o644)  # save_pretrained leaves the weights owner-only; the package ships them


def show_samples(folder: Path) -> None:
    """Greedy continuations and chat answers, read back through the HF auto classes."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    chats = [
        tokenizer.apply_chat_template([m._asdict() for m in chat], add_generation_prompt=True,
                                      tokenize=False)
        for chat in SAMPLE_CHATS
    ]  # fmt: skip
    for prompt in [*PROMPTS, *chats]:
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=200, do_sample=False)
        print(f"--- {prompt!r}\n{tokenizer.decode(output[0], skip_special_tokens=False)}")


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in `folder`, keyed by name."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def check(shipped_dir: Path, steps: int, checkpoint: Path | None) -> int:
    """Rebuild into a temporary folder; 0 if every file matches the shipped one byte for byte."""
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), steps, checkpoint)
        fresh, shipped = file_digests(Path(tmp)), file_digests(shipped_dir)
    for name in sorted(fresh.keys() | shipped.keys()):
        status = "ok" if fresh.get(name) == shipped.get(name) else "MISMATCH"
        print(f"{status:8s} {name}")
    return 0 if fresh == shipped else 1


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR, help="where to write the model")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps")
    parser.add_argument("--check", action="store_true", help="verify --out reproduces")
    parser.add_argument(
        "--checkpoint", type=Path, help="save training state here; resume from it if present"
    )
    args = parser.parse_args()
    if args.check:
        return check(args.out, args.steps, args.checkpoint)
    build(args.out, args.steps, args.checkpoint)
    show_samples(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
