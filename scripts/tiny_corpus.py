"""The tiny model's training text: procedural children's stories, and chats that ask for them.

Pure Python and deterministic: the same seed gives the same documents, on any machine. A plain
document is one story; a chat document is a list of messages (system, user, assistant) in which
the user asks for a story, optionally about someone or something, and may follow up ("tell me
another", "make it shorter", "now one about a fox", "thank you"). make_tiny_model.py renders the
chats with the shipped chat template and trains on both kinds.
"""

from __future__ import annotations

import random
from typing import NamedTuple

__all__ = ["Message", "Story", "Wish", "make_chat", "make_documents", "make_story"]


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


# Which problem sentences a shorter telling keeps, so it still reads as one story.
SHORT_PARTS = {
    "lost": (0, 2, 6, 7),
    "stuck": (0, 3, 4, 5),
    "share": (0, 1, 4, 5),
    "storm": (0, 1, 3, 6),
    "afraid": (0, 2, 4),
    "race": (0, 2, 4, 5),
    "cake": (0, 1, 4, 5),
    "lost_way": (0, 1, 3, 5),
}
# How a user names a story's problem: "Tell me a story about a big storm."
TOPICS = {
    "lost": "a lost toy",
    "stuck": "helping a friend",
    "share": "sharing",
    "storm": "a big storm",
    "afraid": "being brave",
    "race": "a race",
    "cake": "baking a cake",
    "lost_way": "getting lost in the woods",
}


class Wish(NamedTuple):
    """What a user asked a story to be about; None leaves that part to chance."""

    name: str | None = None  # the hero's name, from GIRLS or BOYS
    kind: str | None = None  # from KINDS: "fox", "girl", ...
    trait: str | None = None  # from TRAITS; only with a kind
    home: str | None = None  # from HOMES; only with a kind
    problem: str | None = None  # a key of PROBLEMS


ANY = Wish()  # no wishes: everything left to chance


class Story(NamedTuple):
    """One story, and a shorter telling made of some of the same sentences."""

    text: str
    short: str


def pick(rng: random.Random, template: str, needs: str = "") -> str:
    """Choose one of a template's " | "-separated alternatives (one containing `needs`)."""
    alternatives = [a.strip() for a in template.split(" | ") if needs in a]
    return rng.choice(alternatives)


def article(phrase: str) -> str:
    """Prefix "a" or "an" so that "an owl" and "a dog" both read right."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def pronouns(prefix: str, female: bool) -> dict[str, str]:
    """Pronoun slots (he, He, him, his, His, himself) for one character, keys prefixed."""
    forms = ("she", "her", "her", "herself") if female else ("he", "him", "his", "himself")
    slots = dict(zip(("he", "him", "his", "himself"), forms))
    slots |= {"He": forms[0].capitalize(), "His": forms[2].capitalize()}
    return {prefix + key: value for key, value in slots.items()}


def hero_is_female(rng: random.Random, wish: Wish) -> bool:
    """The hero's sex: fixed by a wished name or by "girl"/"boy", else a coin toss."""
    toss = rng.random() < 0.5  # drawn even when the wish decides
    if wish.name is not None:
        return wish.name in GIRLS
    if wish.kind in ("girl", "boy"):
        return wish.kind == "girl"
    return toss


def story_slots(rng: random.Random, wish: Wish) -> dict[str, str]:
    """Draw the cast, places and things of one story, honouring the wish."""
    slots = {key: rng.choice(options) for key, options in SLOT_WORDS.items()}
    female, friend_female = hero_is_female(rng, wish), rng.random() < 0.5
    slots["name"] = wish.name or rng.choice(GIRLS if female else BOYS)
    slots["friend"] = rng.choice(FRIEND_GIRLS if friend_female else FRIEND_BOYS)
    kind = wish.kind or rng.choice([k for k in KINDS if k != ("boy" if female else "girl")])
    slots["trait"] = wish.trait or slots["trait"]  # "{Who} was very {trait}" agrees with it
    slots["hero"] = f"{wish.trait or rng.choice(TRAITS)} {kind}"
    slots["a_hero"] = article(slots["hero"])
    fkind = rng.choice([k for k in KINDS if k not in ("boy", "girl")])
    slots["a_fkind"] = article(f"{rng.choice(TRAITS)} {fkind}")
    slots["a_home"] = article(f"{rng.choice(HOME_LOOKS)} {wish.home or rng.choice(HOMES)}")
    slots["act"], slots["acted"] = rng.choice(ACTS).split("/")
    slots["toy"] = f"{rng.choice(COLORS)} {rng.choice(TOYS)}"
    slots["a_toy"] = article(slots["toy"])
    slots["spot"], slots["spot2"], slots["spot3"] = rng.sample(SPOTS, 3)
    slots["mhe"] = "she" if slots["mom"] in ("Mom", "Grandma") else "he"
    return slots | pronouns("", female) | pronouns("f", friend_female)


def make_story(rng: random.Random, wish: Wish = ANY) -> Story:
    """Write one story: opening, a problem and how it was solved, a moral, an ending."""
    slots = story_slots(rng, wish)
    problem = wish.problem or rng.choice(sorted(PROBLEMS))
    slots["moral"] = pick(rng, MORALS[problem])

    def sentence(template: str, needs: str = "") -> str:
        # Refer to the hero by name or as "The little dog", so prompts like that are in-domain.
        slots["Who"] = rng.choice((slots["name"], slots["name"], "The " + slots["hero"]))
        slots["said"] = rng.choice((*SAYS, "said", "said"))
        return pick(rng, template, needs).format(**slots)

    # A wished home must be said, so the first sentence is one that mentions it.
    opening = [sentence(OPENINGS[0], "{a_home}" if wish.home else "")]
    opening += [sentence(template) for template in OPENINGS[1:]]
    middle = [sentence(template) for template in PROBLEMS[problem]]
    ending = [sentence(template) for template in ENDINGS]
    short = [opening[0], opening[2], *(middle[i] for i in SHORT_PARTS[problem]), ending[1]]
    return Story(" ".join(opening + middle + ending), " ".join(short))


# --- Chats: a user asks for stories; the assistant tells them. ---
class Message(NamedTuple):
    """One chat message, as a chat template sees it."""

    role: str  # "system", "user" or "assistant"
    content: str


SYSTEMS = (
    "You are a helpful assistant.",
    "You are a helpful assistant.",
    "You are a friendly storyteller.",
    "You tell bedtime stories to young children.",
    "You are a kind assistant who tells stories for kids.",
    "You are a storyteller. Tell happy stories.",
)
# A system prompt of this kind asks for short stories, and gets them.
SHORT_SYSTEMS = (
    "You tell very short stories.",
    "You are a storyteller. Keep your stories short.",
    "Always answer with a short story.",
)
ASKS = (
    "Tell me a story.",
    "Can you tell me a story?",
    "Please tell me a bedtime story.",
    "I want to hear a story!",
    "Tell me a story, please.",
    "Write a story for children.",
    "Hi! Can you tell me a story?",
    "Hello! Tell me a bedtime story, please.",
    "Hello",
    "Hi!",
    "story please",
    "Can I have a story?",
)
# Questions it cannot answer; it tells a story instead, as it does for anything unknown.
OTHER_ASKS = (
    "Who are you?",
    "What can you do?",
    "How are you today?",
    "What is two plus two?",
    "Write a poem about the sea.",
    "What is the weather like?",
    "Can you help me with my homework?",
    "Hello, how are you?",
)
OTHER_LEADS = (
    "I am a little storyteller, so here is a story for you.",
    "I only know how to tell stories. Here is one for you.",
)
WISH_ASKS = (
    "Tell me a story about {s}.",
    "Can you tell me a story about {s}?",
    "Please tell me a bedtime story about {s}.",
    "Write a story about {s}.",
    "I want a story about {s}!",
    "Write a story for kids about {s}.",
    "tell me a story about {s}",
    "story about {s} please",
    "Hi! Can you write a story about {s}?",
    "Could you tell me a story about {s}, please?",
)
LEADS = (
    "Sure! Here is a story for you.",
    "Of course! Here is a bedtime story.",
    "Here is a story for you.",
    "Hello! Here is a story for you.",
    "Okay, here is a story.",
)
WISH_LEADS = (
    "Sure! Here is a story about {s}.",
    "Of course! Here is a story about {s}.",
    "Here is a story about {s}.",
    "Okay! Here is a story about {s}.",
)
ANOTHER_ASKS = (
    "Tell me another one.",
    "Another one, please!",
    "One more story, please.",
    "Can you tell me another story?",
    "another one",
)
ANOTHER_LEADS = (
    "Here is another story.",
    "Sure! Here is another one.",
    "Of course! Here is one more.",
)
SHORTER_ASKS = (
    "Make it shorter.",
    "Can you make it shorter?",
    "That is too long. Please make it shorter.",
    "Shorter, please.",
    "Can you tell it again, but shorter?",
)
SHORTER_LEADS = (
    "Here is a shorter version.",
    "Sure! Here it is in fewer words.",
    "Okay, here is a short one.",
)
NEXT_WISH_ASKS = (
    "Now tell me one about {s}.",
    "Can you tell me a story about {s} now?",
    "Now one about {s}, please.",
    "And a story about {s}?",
)
THANKS = (
    "Thank you!",
    "Thanks, I love it!",
    "That was a nice story.",
    "Thank you, that was great.",
)
WELCOMES = (
    "You are welcome! I am glad you liked it.",
    "You are welcome! Sleep well.",
    "I am happy you liked it! Sweet dreams.",
)


def make_wish(rng: random.Random) -> Wish:
    """A random wish: some of name, kind (with a trait or a home), problem; maybe none."""
    kind = rng.choice(KINDS) if rng.random() < 0.55 else None
    if kind in ("girl", "boy"):
        names = GIRLS if kind == "girl" else BOYS
    else:
        names = rng.choice((GIRLS, BOYS))
    return Wish(
        name=rng.choice(names) if rng.random() < 0.4 else None,
        kind=kind,
        trait=rng.choice(TRAITS) if kind and rng.random() < 0.35 else None,
        home=rng.choice(HOMES) if kind and rng.random() < 0.15 else None,
        problem=rng.choice(sorted(PROBLEMS)) if rng.random() < 0.35 else None,
    )


def wish_phrase(wish: Wish) -> str:
    """How a user says a wish: "a brave fox named Leo who lives in a castle and a big storm"."""
    parts = []
    if wish.kind:
        hero = article(f"{wish.trait} {wish.kind}" if wish.trait else wish.kind)
        hero += f" named {wish.name}" if wish.name else ""
        hero += f" who lives in {article(wish.home)}" if wish.home else ""
        parts.append(hero)
    elif wish.name:
        parts.append(wish.name)
    if wish.problem:
        parts.append(TOPICS[wish.problem])
    return " and ".join(parts)


def casual(rng: random.Random, text: str) -> str:
    """Sometimes type the way people do in a chat box: all lower case."""
    return text.lower() if rng.random() < 0.1 else text


def answer(rng: random.Random, lead: str, text: str) -> Message:
    """The assistant's answer: the text, usually after a short lead-in line."""
    return Message("assistant", text if rng.random() < 0.3 else f"{lead}\n\n{text}")


def story_turn(
    rng: random.Random, wish: Wish, asks: tuple[str, ...], short: bool
) -> tuple[Message, Message, Story]:
    """A user's request for a story (about `wish`), and the assistant's story."""
    story = make_story(rng, wish)
    if wish == ANY and rng.random() < 0.15:
        ask, lead = rng.choice(OTHER_ASKS), rng.choice(OTHER_LEADS)
    elif wish == ANY:
        ask, lead = rng.choice(ASKS), rng.choice(LEADS)
    else:
        phrase = wish_phrase(wish)
        ask, lead = rng.choice(asks).format(s=phrase), rng.choice(WISH_LEADS).format(s=phrase)
    text = story.short if short else story.text
    return Message("user", casual(rng, ask)), answer(rng, lead, text), story


def follow_up(
    rng: random.Random, last: Story | None, short: bool
) -> tuple[Message, Message, Story | None]:
    """A later turn: another story, the last one shorter, one about something new, or thanks.

    Returns the user's message, the answer, and the story a "make it shorter" would shorten.
    """
    kind = rng.choice(("another", "shorter", "wish", "thanks"))
    if kind == "shorter" and last is not None and not short:
        ask = Message("user", casual(rng, rng.choice(SHORTER_ASKS)))
        return ask, answer(rng, rng.choice(SHORTER_LEADS), last.short), None
    if kind == "wish":
        wish = make_wish(rng)
        while wish == ANY:
            wish = make_wish(rng)
        return story_turn(rng, wish, NEXT_WISH_ASKS, short)
    if kind == "thanks":
        ask = Message("user", casual(rng, rng.choice(THANKS)))
        return ask, Message("assistant", rng.choice(WELCOMES)), last
    story = make_story(rng)
    ask = Message("user", casual(rng, rng.choice(ANOTHER_ASKS)))
    return ask, answer(rng, rng.choice(ANOTHER_LEADS), story.short if short else story.text), story


def make_chat(rng: random.Random) -> list[Message]:
    """One conversation: an optional system prompt, then one to three exchanges."""
    roll = rng.random()
    short = roll < 0.1  # the system prompt asks for short stories
    messages = []
    if roll < 0.45:
        messages.append(Message("system", rng.choice(SHORT_SYSTEMS if short else SYSTEMS)))
    ask, reply, last = story_turn(rng, make_wish(rng), WISH_ASKS, short)
    messages += [ask, reply]
    for _ in range(rng.choices((0, 1, 2), weights=(55, 35, 10))[0]):
        ask, reply, last = follow_up(rng, last, short)
        messages += [ask, reply]
    return messages


def make_documents(num_documents: int, chat_share: float, seed: int) -> list[str | list[Message]]:
    """The training documents: plain stories and chats, mixed; the same for the same seed."""
    rng = random.Random(seed)
    return [
        make_chat(rng) if rng.random() < chat_share else make_story(rng).text
        for _ in range(num_documents)
    ]
