"""Train the tiny Qwen3 model that asyncllm ships, so `asyncllm generate` works with no download.

Everything is made here, offline and deterministically: a procedural corpus of children's stories,
a byte-level BPE tokenizer, and a small Qwen3ForCausalLM trained on CPU for a few minutes.

    python scripts/make_tiny_model.py              # (re)write src/asyncllm/assets/tiny-qwen3
    python scripts/make_tiny_model.py --check      # retrain in a temp dir, compare SHA-256 of files
    python scripts/make_tiny_model.py --out /tmp/m --steps 100   # quick experiment
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
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before tokenizers is imported

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "src" / "asyncllm" / "assets" / "tiny-qwen3"
EOS = "<|endoftext|>"
SEED = 1234
NUM_STORIES = 30_000
VOCAB_SIZE = 1024
SEQ_LEN = 128
BATCH_SIZE = 16
DEFAULT_STEPS = 1200
PEAK_LR = 3e-3
PROMPTS = ("Once upon a time", "The little dog", "One day")


def words(text: str) -> list[str]:
    """Split a word list: "a b c", or "a b|c d" when the entries contain spaces."""
    return text.split("|") if "|" in text else text.split()


# --- The story grammar: word lists, then sentence templates ("a | b" picks one alternative). ---
GIRLS = words("Lily Mia Sue Anna Zoe Emma Lucy Rosa Ella Nora")
BOYS = words("Tom Max Ben Sam Leo Jack Tim Finn Noah Kai")
# Friends have names of their own, so no story pairs "Sam and Sam" and greedy decoding copies none.
FRIEND_GIRLS = words("Ruby Daisy Ivy Rose Grace Luna Hazel Molly Bella Coco")
FRIEND_BOYS = words("Jake Owen Milo Hugo Theo Pip Oscar Eli Buddy Rusty")
KINDS = words(
    "dog cat bird rabbit bear fox duck mouse frog owl pig lion turtle squirrel horse "
    "goat puppy kitten dragon monkey elephant hen deer girl boy robot bee penguin"
)
TRAITS = words(
    "little small big happy kind brave shy curious silly friendly young old clever tiny "
    "fluffy gentle playful sleepy funny busy"
)
HOMES = words("village town forest farm house garden valley castle city")
HOME_LOOKS = words("small quiet sunny green busy old big pretty sleepy")
COLORS = words("red blue green yellow pink purple orange white brown golden shiny")
TOYS = words("ball|kite|hat|toy car|teddy bear|book|stone|boat|drum|doll|box|scarf|bell|balloon")
SPOTS = words("bed table chair rug tree bush rock bench sofa pillow leaves")
ACTS = words(
    "play/played|run/ran|jump/jumped|sing/sang|dance/danced|climb trees/climbed "
    "trees|read books/read books|draw pictures/drew pictures|pick flowers/picked flowers|"
    "chase butterflies/chased butterflies|look at the clouds/looked at the clouds|"
    "build sand castles/built sand castles|fly a kite/flew a kite"
)
SAYS = words("said replied shouted whispered")
# Slots filled straight from a word list, once per story.
SLOT_WORDS = {
    "trait": TRAITS,
    "place": words(
        "the park|the forest|the garden|the beach|the farm|the hills|the meadow|"
        "the woods|the playground|the field|the yard|the valley"
    ),
    "sad": words("sad upset worried lonely"),
    "glad": words("happy glad proud thankful excited"),
    "treats": words("cookies apples cherries sweets strawberries cupcakes grapes berries"),
    "number": words("two three four five six"),
    "trap": words("a tall tree|a deep hole|the thick mud|a thorny bush|an old well"),
    "tool": words("stick rope branch ladder vine"),
    "fear": words(
        "the dark|loud noises|deep water|the tall slide|thunder|the big dog next door|"
        "the old house on the hill"
    ),
    "shelter": words("a little cave|an old barn|a hollow log|a big tree house|a small hut"),
    "mom": words("Mom Dad Grandma Grandpa"),
    "One_day": words("One day|One day|One morning|Then one day|One sunny day"),
}

OPENINGS = [
    "Once upon a time, there was {a_hero} named {name}. | Long ago, there lived {a_hero} named "
    "{name}. | There was once {a_hero} named {name}. | Once upon a time, in {a_home}, "
    "there lived {a_hero} named {name}. | One day, {a_hero} named {name} woke up early. | "
    "The {hero} named {name} lived in {a_home}.",
    "{He} loved to {act} in {place}. | Every day, {he} {acted} in {place}. | {He} had {a_toy} "
    "that {he} loved very much. | {Who} was very {trait} and liked to make new friends.",
    "{His} best friend was {friend}, {a_fkind}. | {He} lived near {friend}, {a_fkind}. | "
    "{Who} often played with {friend}, {a_fkind}.",
]
PROBLEMS = {
    "lost": [
        "{One_day}, {name} could not find {his} {toy}. | One morning, {name} lost {his} {toy} "
        "in {place}.",
        "{He} looked under the {spot} and behind the {spot2}, but it was not there.",
        "{Who} felt very {sad}. | {Who} sat down and began to cry.",
        'Then {friend} came by and asked, "Why are you {sad}, {name}?"',
        '"I lost my {toy}," {said} {name}. "Can you help me find it?"',
        '"Of course I will help you!" {said} {friend}. | "Yes, let us look together," '
        "{said} {friend}.",
        "They looked everywhere. At last, {friend} found the {toy} under the {spot3}.",
        '{Who} was so {glad}. "Thank you, {friend}!" {he} {said}.',
    ],
    "stuck": [
        "{One_day}, {name} heard a small voice. It was {friend}, and {fhe} was stuck in {trap}.",
        '"Help! I cannot get out!" cried {friend}.',
        "{Who} was {sad}, but {he} wanted to help. | {Who} thought and thought.",
        "Then {he} had an idea. {He} found a long {tool} and held it out to {friend}.",
        "{friend} held on tight, and {name} pulled and pulled. At last, {friend} was free!",
        '"Thank you for saving me," {said} {friend}. "You are a true friend."',
    ],
    "share": [
        "{One_day}, {name} had {number} {treats}. | One day, {mom} gave {name} {number} {treats}.",
        "{friend} came to play. {fHe} looked at the {treats} and felt {sad}.",
        "At first, {name} did not want to share. | {Who} wanted to keep all the {treats} for "
        "{himself}.",
        "But then {he} saw how {sad} {friend} was.",
        '"Here, you can have some," {said} {name}, and {he} gave {friend} half of the {treats}.',
        "{friend} smiled a big smile. They ate the {treats} together in {place}.",
    ],
    "storm": [
        "{One_day}, {name} and {friend} went to {place} to {act}.",
        "Suddenly, the sky turned dark and the wind began to blow.",
        '"Oh no, a storm is coming!" {said} {friend}.',
        "They ran as fast as they could and hid in {shelter}.",
        "The rain fell and the thunder boomed, but they were safe and warm.",
        "They sang songs until the storm was over. | {Who} told {friend} a funny story.",
        "When the sun came out, they saw a big rainbow in the sky.",
    ],
    "afraid": [
        "{Who} was afraid of {fear}. | {name} was very scared of {fear}.",
        "{He} did not want anyone to know, so {he} kept it a secret.",
        '{One_day}, {friend} {said}, "Do not be scared. I will stay with you."',
        "{Who} took a deep breath and held {friend}'s hand.",
        "It was not so scary after all! {Who} felt very {glad}.",
    ],
    "race": [
        "{One_day}, there was a big race in {place}. | One sunny day, all the animals had a race.",
        "{Who} wanted to win, but {he} was not very fast.",
        "In the middle of the race, {he} fell down and hurt {his} knee.",
        '{He} wanted to stop, but {friend} shouted, "You can do it, {name}!"',
        "So {name} got up and kept going. {He} did not win, but {he} finished the race.",
        "Everyone cheered, and {name} felt very {glad}.",
    ],
    "cake": [
        "{One_day}, {name} and {friend} wanted to bake a cake for {mom}.",
        "They put flour, eggs, milk and sugar in a big bowl. | They mixed everything in a bowl.",
        "Soon the kitchen was very messy, and there was flour on {name}'s nose!",
        "They laughed and cleaned up together.",
        "When the cake was ready, they gave it to {mom}. | {mom} was so happy when {mhe} saw "
        "the cake.",
        '"This is the best cake ever!" {said} {mom}.',
    ],
    "lost_way": [
        "{One_day}, {name} went into the woods to pick flowers.",
        "{He} walked and walked, and soon {he} did not know where {he} was.",
        "{Who} felt very {sad}. It was getting dark.",
        'Then {he} met {friend}, {a_fkind}. "I know the way home," {said} {friend}.',
        "They followed the little river until they saw {name}'s house.",
        '{mom} gave {name} a big hug. "I was so worried about you," {mhe} {said}.',
    ],
}
MORALS = {
    "lost": "friends help each other | it is okay to ask for help",
    "stuck": "it is good to be brave and help others | a true friend is always there",
    "share": "sharing makes everyone happy | it is good to share with your friends",
    "storm": "friends make scary things less scary | after the rain comes the sun",
    "afraid": "being brave is easier with a friend | it is good to be brave",
    "race": "you should never give up | trying your best is what matters",
    "cake": "working together is fun | working together makes hard things easy",
    "lost_way": "you should stay close to home | it is good to be careful",
}
ENDINGS = [
    "The moral of the story is that {moral}. | {Who} learned that {moral}. | Now {name} "
    "knew that {moral}.",
    "From that day on, {name} and {friend} were best friends. | They played together until the "
    "sun went down. | And they all lived happily ever after. | The end.",
]


def pick(rng: random.Random, template: str) -> str:
    """Choose one of a template's " | "-separated alternatives."""
    return rng.choice(template.split(" | ")).strip()


def article(phrase: str) -> str:
    """Prefix "a" or "an" so that "an owl" and "a dog" both read right."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def pronouns(prefix: str, female: bool) -> dict[str, str]:
    """Pronoun slots (he, He, him, his, His, himself) for one character, keys prefixed."""
    forms = ("she", "her", "her", "herself") if female else ("he", "him", "his", "himself")
    slots = dict(zip(("he", "him", "his", "himself"), forms))
    slots |= {"He": forms[0].capitalize(), "His": forms[2].capitalize()}
    return {prefix + key: value for key, value in slots.items()}


def story_slots(rng: random.Random) -> dict[str, str]:
    """Draw the cast, places and things of one story."""
    slots = {key: rng.choice(options) for key, options in SLOT_WORDS.items()}
    female, friend_female = rng.random() < 0.5, rng.random() < 0.5
    slots["name"] = rng.choice(GIRLS if female else BOYS)
    slots["friend"] = rng.choice(FRIEND_GIRLS if friend_female else FRIEND_BOYS)
    kind = rng.choice([k for k in KINDS if k != ("boy" if female else "girl")])
    slots["hero"] = f"{rng.choice(TRAITS)} {kind}"
    slots["a_hero"] = article(slots["hero"])
    fkind = rng.choice([k for k in KINDS if k not in ("boy", "girl")])
    slots["a_fkind"] = article(f"{rng.choice(TRAITS)} {fkind}")
    slots["a_home"] = article(f"{rng.choice(HOME_LOOKS)} {rng.choice(HOMES)}")
    slots["act"], slots["acted"] = rng.choice(ACTS).split("/")
    slots["toy"] = f"{rng.choice(COLORS)} {rng.choice(TOYS)}"
    slots["a_toy"] = article(slots["toy"])
    slots["spot"], slots["spot2"], slots["spot3"] = rng.sample(SPOTS, 3)
    slots["mhe"] = "she" if slots["mom"] in ("Mom", "Grandma") else "he"
    return slots | pronouns("", female) | pronouns("f", friend_female)


def make_story(rng: random.Random) -> str:
    """Write one story: opening, a problem and how it was solved, a moral, an ending."""
    slots = story_slots(rng)
    problem = rng.choice(sorted(PROBLEMS))
    slots["moral"] = pick(rng, MORALS[problem])
    sentences = []
    for template in [*OPENINGS, *PROBLEMS[problem], *ENDINGS]:
        # Refer to the hero by name or as "The little dog", so prompts like that are in-domain.
        slots["Who"] = rng.choice((slots["name"], slots["name"], "The " + slots["hero"]))
        slots["said"] = rng.choice((*SAYS, "said", "said"))
        sentences.append(pick(rng, template).format(**slots))
    return " ".join(sentences)


def make_corpus(num_stories: int, seed: int) -> list[str]:
    """The whole training text as a list of stories; the same for the same seed."""
    rng = random.Random(seed)
    return [make_story(rng) for _ in range(num_stories)]


def train_tokenizer(stories: list[str]) -> Tokenizer:
    """Byte-level BPE: every byte is in the vocabulary, so any UTF-8 text round-trips."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(stories, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """Write tokenizer.json plus the config that makes AutoTokenizer load it without changes."""
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": EOS,
        "bos_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


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


def train(model: Qwen3ForCausalLM, tokens: torch.Tensor, steps: int) -> float:
    """Train on random windows of the token stream; returns the mean loss of the last 50 steps."""
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=PEAK_LR, weight_decay=0.1, betas=(0.9, 0.95)
    )
    model.train()
    recent: list[float] = []
    start = time.monotonic()
    for step in range(steps):
        starts = torch.randint(0, len(tokens) - SEQ_LEN, (BATCH_SIZE,), generator=generator)
        batch = torch.stack([tokens[s : s + SEQ_LEN] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        # The model shifts labels by one itself.
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = [*recent[-49:], loss.item()]
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.monotonic() - start:6.1f}s")
    return sum(recent) / len(recent)


def build(out: Path, steps: int) -> None:
    """Make corpus, tokenizer and model, and write them all to `out`."""
    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)  # fixed thread count: float sums must happen in the same order
    torch.use_deterministic_algorithms(True)
    stories = make_corpus(NUM_STORIES, SEED)
    tokenizer = train_tokenizer(stories)
    eos_id = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(stories):
        ids += [*encoding.ids, eos_id]
    tokens = torch.tensor(ids, dtype=torch.long)
    vocab_size = tokenizer.get_vocab_size()
    print(f"corpus: {len(stories)} stories, {len(tokens)} tokens, vocab {vocab_size}")
    config = model_config(vocab_size, eos_id)
    model = Qwen3ForCausalLM(config).float()
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters")
    start = time.monotonic()
    final_loss = train(model, tokens, steps)
    print(f"trained {steps} steps in {time.monotonic() - start:.0f}s, final loss {final_loss:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    GenerationConfig(eos_token_id=eos_id, pad_token_id=eos_id, do_sample=False).save_pretrained(out)
    save_tokenizer(tokenizer, out)
    for path in out.iterdir():
        path.chmod(0o644)  # save_pretrained leaves the weights owner-only; the package ships them


def show_samples(folder: Path) -> None:
    """Greedy continuations from the files as shipped, read back through the HF auto classes."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=48, do_sample=False)
        print(f"--- {prompt!r}\n{tokenizer.decode(output[0], skip_special_tokens=False)}")


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in `folder`, keyed by name."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def check(shipped_dir: Path, steps: int) -> int:
    """Rebuild into a temporary folder; 0 if every file matches the shipped one byte for byte."""
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), steps)
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
    args = parser.parse_args()
    if args.check:
        return check(args.out, args.steps)
    build(args.out, args.steps)
    show_samples(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
