"""Seeded, deterministic HelpSteer2-schema data (ratings and preference pairs) for the offline demo and tests.

Not for claims about quality: the texts are templated. What matters is that every label follows
from how the response was built, so a head on a real LM's hidden states has something to learn.

Tasks (each with a checkable answer; many templates, random names and numbers):
  arithmetic (add, subtract, multiply, divide, percentage discount, two-step price), unit
  conversion, capital cities, chemical symbols, output of a short Python snippet.
A response is built from a `Spec` (kind, outcome, coherence, complexity, verbosity):
  [opening filler] [restatement] answer + explanation [elaborations] [false claim] [closing filler]

Labels (ints 0-4), by construction (`labels_for`):
  correctness  answer: 4 right answer; 2 right answer plus one false side claim;
               1 near miss (off by a little, wrong factor, a non-capital city of that country);
               0 far off. refusal: 1. off-topic (a right answer to another question): 0.
  verbosity    = Spec.verbosity: number of sentences beyond answer + explanation is
               0 / 1 / 2-3 / 4 / 5-6 for levels 0..4 (half elaborations, half fillers).
               Refusals: 0 (one sentence) or 1 (two sentences).
  coherence    = Spec.coherence: 4 in order; 3 one non-sequitur inserted; 2 sentences shuffled;
               1 shuffled + one non-sequitur; 0 shuffled + two non-sequiturs + a repeated
               sentence. Refusals: 4.
  complexity   = Spec.complexity: the register of the explanation and elaboration sentences,
               0 plain everyday words ... 4 technical vocabulary. Refusals: 0 (curt) or 1 (formal).
  helpfulness  answer: clip(base - coherence_penalty - verbosity_penalty, 0, 4) with
               base = 4 correct, 3 false claim, 1 near miss, 0 far off;
               coherence_penalty = 3, 2, 1, 1, 0 for coherence 0..4;
               verbosity_penalty = 1, 0, 0, 0, 1 for verbosity 0..4 (bare or padded answers lose one).
               refusal: 0 curt, 1 with a pointer elsewhere. off-topic: 0.

Preference pairs (`make_preferences`): two responses to the same prompt, rendered from the same
content seed, whose specs differ in one driver, named by `subset`: "correctness" (right vs
wrong/false claim), "coherence" (in order vs disrupted), "verbosity" (two different lengths),
"helpfulness" (a right answer vs a refusal or an off-topic answer). The "true" reward is
  R = 1.0*helpfulness + 0.5*correctness + 0.25*coherence + 0.0*complexity - 0.1*verbosity
(`PAIR_WEIGHTS`, `true_reward`); chosen = higher R, margin = R(chosen) - R(rejected) > 0.

Randomness: only `random.Random` seeded with strings that name the stream, the seed and the row,
so row i does not depend on n, and the same (n, seed) always gives identical output.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline import ATTRIBUTES
from pipeline.atomic import atomic_write
from pipeline.data.nemo_turns import TURN_ASSISTANT, TURN_USER, split_helpsteer2_prompt
from pipeline.data.records import PreferencePair, RatingRow

PAIR_WEIGHTS = {"helpfulness": 1.0, "correctness": 0.5, "coherence": 0.25, "complexity": 0.0, "verbosity": -0.1}
SUBSETS = ("correctness", "coherence", "verbosity", "helpfulness")

OUTCOME_CORRECTNESS = {"correct": 4, "false_claim": 2, "near_miss": 1, "wrong": 0}
OUTCOME_HELP_BASE = {"correct": 4, "false_claim": 3, "near_miss": 1, "wrong": 0}
COHERENCE_PENALTY = (3, 2, 1, 1, 0)
VERBOSITY_PENALTY = (1, 0, 0, 0, 1)


# ----------------------------------------------------------------------------- specs and labels


@dataclass(frozen=True)
class Spec:
    """How to build one response; its labels follow from it (`labels_for`)."""

    kind: str = "answer"  # "answer" | "refusal" | "off_topic"
    outcome: str = "correct"  # "correct" | "false_claim" | "near_miss" | "wrong" (kind "answer" only)
    coherence: int = 4
    complexity: int = 2
    verbosity: int = 2


def labels_for(spec: Spec) -> dict[str, int]:
    """The five HelpSteer2 labels of a response built from `spec` (rules in the module docstring)."""
    if spec.kind == "refusal":
        return {"helpfulness": min(spec.verbosity, 1), "correctness": 1, "coherence": 4,
                "complexity": min(spec.complexity, 1), "verbosity": min(spec.verbosity, 1)}
    if spec.kind == "off_topic":
        return {"helpfulness": 0, "correctness": 0, "coherence": spec.coherence,
                "complexity": spec.complexity, "verbosity": spec.verbosity}
    help_ = (OUTCOME_HELP_BASE[spec.outcome] - COHERENCE_PENALTY[spec.coherence]
             - VERBOSITY_PENALTY[spec.verbosity])
    return {"helpfulness": max(0, min(4, help_)), "correctness": OUTCOME_CORRECTNESS[spec.outcome],
            "coherence": spec.coherence, "complexity": spec.complexity, "verbosity": spec.verbosity}


def true_reward(labels: dict[str, float]) -> float:
    """The documented overall reward that decides which side of a synthetic pair is chosen."""
    return sum(PAIR_WEIGHTS[a] * float(labels[a]) for a in ATTRIBUTES)


def sample_spec(rng: random.Random) -> Spec:
    kind = rng.choices(("answer", "refusal", "off_topic"), (0.9, 0.05, 0.05))[0]
    if kind == "refusal":
        return Spec("refusal", "correct", 4, rng.randint(0, 1), rng.randint(0, 1))
    outcome = rng.choices(("correct", "false_claim", "near_miss", "wrong"), (0.55, 0.12, 0.2, 0.13))[0]
    return Spec(
        kind,
        outcome,
        coherence=rng.choices(range(5), (0.08, 0.1, 0.14, 0.2, 0.48))[0],
        complexity=rng.choices(range(5), (0.18, 0.22, 0.24, 0.2, 0.16))[0],
        verbosity=rng.choices(range(5), (0.12, 0.24, 0.28, 0.2, 0.16))[0],
    )


# ----------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One question with a checkable answer, and the templates to answer it in five registers."""

    family: str  # arithmetic | conversion | capital | element | code
    domain: str  # which elaboration sentences fit: math | code | geo | chem
    question: str
    truth: str
    near: str  # a near miss
    far: str  # far off
    explain: tuple  # 5 lists of templates, one per complexity level
    answers_first: list[str]
    answers_last: list[str]
    topic: str
    fields: dict = field(default_factory=dict)
    value_fmt: str = "{}"
    near_fields: dict = field(default_factory=dict)  # overrides when stating the near miss (a consistent slip)


NAMES = ("Maria", "John", "Aisha", "Kenji", "Lena", "Tom", "Priya", "Carlos", "Sofia", "Omar", "Emma",
         "Liam", "Noah", "Mia", "Yuki", "Ravi", "Chloe", "Diego", "Hana", "Ivan", "Zara", "Ben")
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "stamps", "shells",
         "balloons", "oranges", "coins", "toy cars", "cupcakes")
THINGS = ("a book", "lunch", "a new shirt", "groceries", "a concert ticket", "a board game", "flowers")
GOODS = ("notebooks", "T-shirts", "mugs", "tickets", "plants", "umbrellas", "lamps", "chairs")
WORDS = ("python", "banana", "keyboard", "river", "galaxy", "orange", "pencil", "window", "mountain",
         "coffee", "rainbow", "elephant", "garden", "rocket", "silver", "planet", "jungle", "candle")

MATH_EXPLAIN = (
    ["Just {plain}: {lhs} = {v}.", "{Plain} and you get {lhs} = {v}.", "It is {lhs} = {v}. Easy."],
    ["To find it, you {plain}, so {lhs} = {v}.", "You need to {verb} here: {lhs} = {v}.",
     "First {plain}, which gives {lhs} = {v}."],
    ["This is {a_noun} problem, so we calculate {lhs} = {v}.",
     "We {verb} the given amounts to get the result: {lhs} = {v}.",
     "Writing the calculation out gives {lhs} = {v}."],
    ["The problem reduces to {a_noun} calculation, so we evaluate {lhs} = {v} to obtain the requested quantity.",
     "Translating the word problem into an expression, the relevant operation is {noun}, and evaluating "
     "{lhs} yields {v}."],
    ["Formally, we model the situation as {tech}; evaluating {lhs} = {v} gives the quantity exactly, "
     "with no rounding.",
     "Abstracting the narrative into an arithmetic expression, we apply {tech}, which yields {lhs} = {v} "
     "as an exact integer result."],
)
CONVERSION_EXPLAIN = (
    ["Remember that {rule}: {lhs} = {v}.", "Use the rule that {rule}, so {lhs} = {v}."],
    ["The rule is that {rule}, so {lhs} = {v}.", "Because {rule}, you work it out as {lhs} = {v}."],
    ["To convert, we use the fact that {rule}, which gives {lhs} = {v}.",
     "Using the standard conversion, where {rule}, we get {lhs} = {v}."],
    ["The conversion applies {rule_tech}, so the quantity becomes {lhs} = {v}.",
     "Applying {rule_tech} to the given quantity yields {lhs} = {v}."],
    ["Treating the change of units as {rule_tech}, dimensional analysis gives {lhs} = {v}, with the "
     "original units cancelling exactly.",
     "Formally, the conversion is {rule_tech}; composing it with the given measurement yields {lhs} = {v} "
     "without any loss of precision."],
)
CAPITAL_EXPLAIN = (
    ["{v} is where the leaders of {country} work.", "The big bosses of {country} meet in {v}."],
    ["{v} is the city where the government of {country} is based.",
     "The government of {country} has its main offices in {v}."],
    ["As the capital, {v} is home to the national government and most of the official institutions of "
     "{country}."],
    ["{v} serves as the seat of the national government of {country}, hosting its legislature and "
     "principal executive offices."],
    ["Constitutionally and administratively, {v} functions as the seat of government of {country}, "
     "concentrating the legislative, executive and diplomatic apparatus of the state."],
)
ELEMENT_EXPLAIN = (
    ["On the periodic table, {element} is shown as {v}.", "People write {element} as {v} for short."],
    ["Each element has a short symbol, and for {element} it is {v}.",
     "Chemists use {v} as the short name for {element}."],
    ["Every element on the periodic table has a one- or two-letter symbol, and {element} is listed as {v}."],
    ["Chemical symbols are standardised abbreviations, and {element} is denoted {v} in formulas and on the "
     "periodic table."],
    ["Under IUPAC conventions, each element is assigned a unique symbol, often derived from its Latin or "
     "Greek name, and {element} is designated {v}, which is how it appears in molecular formulas."],
)
CODE_EXPLAIN = (
    ["It just {plain}, so you get {v}.", "The code {plain}. That gives {v}."],
    ["The code {plain}, which gives {v}.", "Here Python {plain} and prints {v}."],
    ["When Python runs this, it {plain} and prints the result, {v}.",
     "Step by step, the program {plain}, so the printed value is {v}."],
    ["Python evaluates {tech}, and print writes the resulting value, {v}, to standard output.",
     "The expression is evaluated using {tech}, which produces {v} before print outputs it."],
    ["Under CPython's evaluation semantics, the interpreter evaluates {tech}; the resulting object, {v}, "
     "is converted with str() and written to sys.stdout by print.",
     "Semantically, evaluation proceeds via {tech}, and print then serialises the resulting object, {v}, "
     "through its __str__ method to the standard output stream."],
)

ELABORATIONS = {
    "math": (
        ["Math like this is easy once you practice.", "You can use your fingers or a pen to check.",
         "Take it slow and it will be fine.", "Numbers like these are not hard."],
        ["You can check the answer by doing the sum again.", "It helps to write the numbers down first.",
         "Drawing a small picture can make it easier to see.", "Going step by step keeps mistakes away."],
        ["A good way to check is to reverse the operation and see if you get back the starting numbers.",
         "Estimating the answer first helps you notice if something went wrong.",
         "Writing the calculation as an equation makes each step clear.",
         "Keeping track of the units helps make sure the result makes sense."],
        ["Verifying the result with the inverse operation is a reliable consistency check.",
         "An order-of-magnitude estimate provides a quick sanity check on the computed value.",
         "Expressing the problem as an equation separates the modelling step from the arithmetic itself.",
         "Dimensional consistency of the units offers an additional check on the setup."],
        ["One can verify the result by applying the inverse operation, exploiting the algebraic structure of "
         "the integers, or by bounding the value with interval estimates.",
         "Such word problems are exercises in mathematical modelling: the narrative is mapped onto an "
         "expression whose evaluation is then purely mechanical.",
         "Dimensional analysis provides an invariant check, since any well-formed expression must yield a "
         "quantity in the units the question requests.",
         "Integer arithmetic is exact, so no floating-point rounding error can accumulate in the computation."],
    ),
    "code": (
        ["You can run it yourself to see.", "Python is fun to try out.",
         "Small programs like this are easy to test.", "Just type it in and press enter."],
        ["You can paste the code into Python to check it.",
         "Reading each line in order helps you follow what happens.",
         "Printing values as you go is a handy way to learn.",
         "Try changing the numbers to see how the output changes."],
        ["A good habit is to trace the code line by line and write down the value of each variable.",
         "Running the snippet in an interactive Python shell is the quickest way to confirm the output.",
         "Python evaluates expressions from the inside out before printing the result.",
         "Small experiments like this are a good way to learn how built-in functions behave."],
        ["Tracing the program state after each statement makes the evaluation order explicit.",
         "The interactive interpreter is a convenient environment for verifying such behaviour empirically.",
         "Built-in functions like these are implemented in C, so their behaviour is well defined and fast.",
         "Understanding operator precedence and evaluation order prevents most mistakes with such snippets."],
        ["Formally, one can reason about the snippet with an operational semantics that tracks the "
         "environment binding each name to an object.",
         "Because the built-ins involved are pure functions of their arguments, the output is deterministic "
         "and independent of interpreter state.",
         "The str() conversion performed by print is governed by the __str__ protocol of the resulting "
         "object's type.",
         "In CPython these operations compile to a short bytecode sequence, which the dis module can display "
         "for inspection."],
    ),
    "geo": (
        ["Capital cities are often big and busy.", "Many people visit capitals on holiday.",
         "Maps often show capitals with a star.", "It is a nice place to visit."],
        ["The capital is where the main government offices are.",
         "You can find the capital marked on most maps.",
         "Not every capital is the biggest city in its country.", "Capitals often have famous old buildings."],
        ["Capital cities usually host the parliament, the main courts and foreign embassies.",
         "It is a common mistake to assume the largest city is always the capital.",
         "Some countries moved their capital in the twentieth century for political reasons.",
         "An atlas or an official government website is a reliable way to confirm a capital."],
        ["The choice of a capital frequently reflects historical compromise rather than population size.",
         "Capitals concentrate legislative, judicial and diplomatic institutions in a single location.",
         "Several states have relocated their seat of government to promote development in the interior.",
         "Administrative geography distinguishes the political capital from the economic centre."],
        ["In political geography, the designation of a capital is a constitutional and symbolic act that need "
         "not coincide with demographic or economic primacy.",
         "Planned capitals, designed to neutralise regional rivalries, illustrate how the seat of government "
         "can be an instrument of state-building.",
         "The distinction between de jure and de facto capitals matters where constitutional provisions and "
         "the location of government institutions diverge.",
         "Core-periphery models in economic geography help explain why primate cities often differ from the "
         "administrative capital."],
    ),
    "chem": (
        ["The periodic table is a big chart of all the elements.", "Each element has a short name.",
         "Symbols are easy to learn with practice.", "You can find this on any chart in a science class."],
        ["Symbols start with a capital letter.", "Some symbols come from old Latin names.",
         "Chemists use symbols to write formulas quickly.", "A periodic table poster is handy for checking."],
        ["A symbol has one or two letters, and only the first letter is capitalised.",
         "Several symbols, such as those for gold and iron, come from Latin names rather than English ones.",
         "Symbols make chemical formulas much shorter to write.",
         "The periodic table arranges elements by atomic number."],
        ["Chemical symbols are standardised internationally, so they are the same in every language.",
         "Symbols derived from Latin names reflect the historical development of chemical nomenclature.",
         "The periodic table orders elements by atomic number, revealing periodic trends in their properties.",
         "Symbols function as compact identifiers in stoichiometric formulas and reaction equations."],
        ["IUPAC maintains the canonical list of element symbols, and provisional systematic symbols are "
         "assigned to newly synthesised elements until permanent names are ratified.",
         "The periodicity of the table reflects the filling of electron shells, which governs the chemical "
         "behaviour associated with each symbol.",
         "Symbols of Latin origin persist as historical artefacts of pre-modern chemical nomenclature.",
         "In stoichiometric notation, an element symbol can denote one mole of atoms in a balanced equation."],
    ),
}

OPEN_FILLERS = ("Sure!", "Great question.", "Happy to help.", "Of course.", "Let's work through it.",
                "Good question!", "Here is the answer.", "Thanks for asking.")
RESTATEMENTS = ("Let's look at {topic}.", "This question is about {topic}.", "Here we need to work out {topic}.")
CLOSE_FILLERS = ("I hope this helps.", "Let me know if you have any other questions.",
                 "Feel free to ask if anything is unclear.", "Good luck with your work!", "Have a great day!",
                 "I am happy to explain further if needed.")
NON_SEQUITURS = (
    "My cousin once owned a very loud parrot.", "The ocean looks especially blue in the summer.",
    "Bananas are technically berries.", "I have always preferred trains to buses.",
    "Some people collect old spoons as a hobby.", "Yesterday the sky looked like a painting.",
    "Pizza tastes better on Fridays.", "Penguins cannot fly but they swim very well.",
    "The library closes early on holidays.", "My favourite colour is green.",
    "Socks often go missing in the laundry.", "Jazz was very popular in the twenties.",
    "Cats sleep for most of the day.", "The moon looks larger near the horizon.",
    "Tea is best served with a biscuit.", "Some trees can live for thousands of years.",
)
FALSE_CLAIMS = (
    "Also, remember that the Sun orbits the Earth once a year.",
    "As a side note, water boils at 50 degrees Celsius at sea level.",
    "Fun fact: spiders are insects with six legs.", "By the way, there are ten hours in a day.",
    "Keep in mind that seven is an even number.", "Note that a week has five days.",
    "Interestingly, the Great Wall of China is in Japan.", "Also, one kilometre is one hundred metres.",
    "Remember that the Pacific is the smallest ocean.", "By the way, sound travels faster than light.",
    "Also, Python lists are indexed starting from one.", "Note that gold is the lightest metal.",
)
REFUSALS = (
    ["Sorry, I can't help with that.", "I can't answer this, sorry.", "Sorry, I don't know."],
    ["I'm sorry, but I am not able to help with this request.",
     "Unfortunately, I cannot provide an answer to this question.",
     "I'm afraid I can't assist with this one."],
)
REFUSAL_POINTERS = ("You could try looking it up in a textbook or a reliable website.",
                    "A teacher or a search engine may be able to help you with this.",
                    "You might find the answer in an encyclopedia.")

NUMERIC_ANSWERS_FIRST = ["The answer is {v}{unit}.", "The answer is {v}{unit}, and here is why."]
NUMERIC_ANSWERS_LAST = ["So the answer is {v}{unit}.", "Therefore, the answer is {v}{unit}.",
                        "That means the answer is {v}{unit}."]


def _near_int(rng: random.Random, truth: int) -> int:
    for _ in range(20):
        x = truth + rng.choice((-10, -2, -1, 1, 2, 10))
        if x >= 0 and x != truth:
            return x
    return truth + 1


def _far_int(rng: random.Random, truth: int, avoid: int) -> int:
    for _ in range(50):
        x = rng.randint(0, 3 * truth + 40)
        if abs(x - truth) > max(3, truth // 3) and x != avoid:
            return x
    return 3 * truth + 41


def _arithmetic(rng: random.Random) -> Task:
    op = rng.choice(("add", "sub", "mul", "div", "pct", "two"))
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if op == "add":
        a, b = rng.randint(2, 80), rng.randint(2, 80)
        truth, lhs, unit = a + b, f"{a} + {b}", f" {item}"
        question = rng.choice([
            f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            f"There are {a} {item} in one box and {b} {item} in another. How many {item} are there altogether?",
            f"{name} collected {a} {item} on Monday and {b} on Tuesday. How many {item} did {name} collect?",
            f"A class made {a} {item} in the morning and {b} in the afternoon. What is the total number of {item}?",
        ])
        v = dict(plain="add them up", verb="add", noun="addition", a_noun="an addition",
                 tech="a sum of two non-negative integer quantities")
    elif op == "sub":
        b = rng.randint(2, 60)
        a = b + rng.randint(1, 90)
        truth, lhs, unit = a - b, f"{a} - {b}", " dollars"
        thing = rng.choice(THINGS)
        question = rng.choice([
            f"{name} had {a} dollars and spent {b} dollars on {thing}. How many dollars are left?",
            f"A jar holds {a} dollars. {name} takes out {b} dollars for {thing}. How much money is still in the jar?",
            f"{name} saved {a} dollars and then paid {b} dollars for {thing}. How many dollars does {name} have now?",
        ])
        v = dict(plain="take the smaller number away", verb="subtract", noun="subtraction",
                 a_noun="a subtraction", tech="the difference of two integers, the amount spent taken from the total")
    elif op == "mul":
        a, b = rng.randint(2, 15), rng.randint(2, 24)
        truth, lhs, unit = a * b, f"{a} × {b}", f" {item}"
        question = rng.choice([
            f"{name} has {a} boxes with {b} {item} in each box. How many {item} are there in total?",
            f"There are {a} rows of {item} with {b} in each row. How many {item} are there?",
            f"Each bag holds {b} {item}. How many {item} are in {a} bags?",
        ])
        v = dict(plain="multiply them", verb="multiply", noun="multiplication", a_noun="a multiplication",
                 tech="a product of a count of groups and the size of each group")
    elif op == "div":
        b, q = rng.randint(2, 12), rng.randint(2, 15)
        a = b * q
        truth, lhs, unit = q, f"{a} ÷ {b}", f" {item}"
        question = rng.choice([
            f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?",
            f"{a} {item} are packed equally into {b} bags. How many {item} go in each bag?",
            f"A teacher splits {a} {item} evenly between {b} groups. How many {item} does each group receive?",
        ])
        v = dict(plain="split it evenly", verb="divide", noun="division", a_noun="a division",
                 tech="an exact integer quotient, since the dividend is a multiple of the divisor")
    elif op == "pct":
        price, d = 20 * rng.randint(1, 25), rng.choice((10, 15, 20, 25, 50))
        truth, lhs, unit = price * (100 - d) // 100, f"{price} - {price} × {d}%", " dollars"
        good = rng.choice(("notebook", "T-shirt", "mug", "lamp", "chair", "backpack", "jacket", "kettle"))
        question = rng.choice([
            f"A {good} costs {price} dollars and is on sale for {d}% off. What is the sale price in dollars?",
            f"{name} wants a {good} that normally costs {price} dollars. With a {d}% discount, how much does it cost?",
            f"The price of a {good} is {price} dollars. If the shop takes {d}% off, what is the new price?",
        ])
        v = dict(plain="take the discount off the price", verb="take the percentage off", noun="a percentage reduction",
                 a_noun="a percentage", tech=f"a multiplicative scaling of the price by (1 - {d}/100)")
    else:
        q, p, f = rng.randint(2, 9), rng.randint(3, 30), rng.randint(2, 15)
        truth, lhs, unit = q * p + f, f"{q} × {p} + {f}", " dollars"
        good = rng.choice(GOODS)
        question = rng.choice([
            f"{name} buys {q} {good} at {p} dollars each and pays {f} dollars for delivery. What is the total cost?",
            f"{good.capitalize()} cost {p} dollars each. {name} orders {q} of them plus a {f} dollar shipping fee. "
            "How much is the bill in dollars?",
        ])
        v = dict(plain="multiply first, then add the fee", verb="multiply and then add", noun="a two-step calculation",
                 a_noun="a two-step", tech="an affine function of the quantity, price times quantity plus a fixed fee")
    near = _near_int(rng, truth)
    v.update(lhs=lhs, unit=unit, Plain=v["plain"][0].upper() + v["plain"][1:])
    return Task("arithmetic", "math", question, str(truth), str(near), str(_far_int(rng, truth, near)),
                MATH_EXPLAIN, NUMERIC_ANSWERS_FIRST, NUMERIC_ANSWERS_LAST, "the final amount in this problem", v)


CONVERSIONS = (  # from singular, from plural, to plural, factor, a typical wrong factor, range of amounts
    ("kilometre", "kilometres", "metres", 1000, 100, (2, 40)),
    ("metre", "metres", "centimetres", 100, 10, (2, 50)),
    ("kilogram", "kilograms", "grams", 1000, 100, (2, 30)),
    ("hour", "hours", "minutes", 60, 100, (2, 24)),
    ("minute", "minutes", "seconds", 60, 100, (2, 30)),
    ("day", "days", "hours", 24, 12, (2, 14)),
    ("week", "weeks", "days", 7, 5, (2, 20)),
    ("foot", "feet", "inches", 12, 10, (2, 30)),
    ("yard", "yards", "feet", 3, 12, (2, 40)),
    ("litre", "litres", "millilitres", 1000, 100, (2, 20)),
    ("dozen", "dozen", "eggs", 12, 10, (2, 15)),
    ("year", "years", "months", 12, 10, (2, 20)),
)


def _conversion(rng: random.Random) -> Task:
    if rng.random() < 0.15:
        c = 5 * rng.randint(-4, 20)
        truth, near = c * 9 // 5 + 32, c * 2 + 30
        if near == truth:
            near = c + 32
        to_p, lhs = "degrees Fahrenheit", f"{c} × 9/5 + 32"
        question = rng.choice([f"What is {c} degrees Celsius in degrees Fahrenheit?",
                               f"Convert {c} degrees Celsius to Fahrenheit.",
                               f"The thermometer shows {c} degrees Celsius. What is that in Fahrenheit?"])
        fields = dict(rule="you multiply by 9/5 and then add 32",
                      rule_tech="the affine map F = C × 9/5 + 32, a scale factor plus an offset of 32 degrees")
        near_fields = dict(rule="you double it and then add 30", lhs=f"{c} × 2 + 30",
                           rule_tech="the affine map F = 2C + 30, a scale factor plus an offset of 30 degrees")
        topic = f"what {c} degrees Celsius is in Fahrenheit"
    else:
        from_s, from_p, to_p, factor, wrong, (lo, hi) = rng.choice(CONVERSIONS)
        x = rng.randint(lo, hi)
        truth, near, lhs = x * factor, x * wrong, f"{x} × {factor}"
        question = rng.choice([f"How many {to_p} are in {x} {from_p}?", f"Convert {x} {from_p} to {to_p}.",
                               f"What is {x} {from_p} in {to_p}?", f"I have {x} {from_p}. How many {to_p} is that?"])
        fields = dict(rule=f"one {from_s} is {factor} {to_p}",
                      rule_tech=f"a constant conversion factor of {factor} {to_p} per {from_s}")
        near_fields = dict(rule=f"one {from_s} is {wrong} {to_p}", lhs=f"{x} × {wrong}",
                           rule_tech=f"a constant conversion factor of {wrong} {to_p} per {from_s}")
        topic = f"how many {to_p} are in {x} {from_p}"
    fields.update(lhs=lhs, unit=f" {to_p}")
    return Task("conversion", "math", question, str(truth), str(near), str(_far_int(rng, abs(truth), near)),
                CONVERSION_EXPLAIN, NUMERIC_ANSWERS_FIRST, NUMERIC_ANSWERS_LAST, topic, fields,
                near_fields=near_fields)


CAPITALS = (  # country, capital, a larger or better-known city that is not the capital
    ("Australia", "Canberra", "Sydney"), ("Canada", "Ottawa", "Toronto"), ("Brazil", "Brasilia", "Rio de Janeiro"),
    ("Turkey", "Ankara", "Istanbul"), ("Switzerland", "Bern", "Zurich"), ("Nigeria", "Abuja", "Lagos"),
    ("Pakistan", "Islamabad", "Karachi"), ("India", "New Delhi", "Mumbai"), ("China", "Beijing", "Shanghai"),
    ("Japan", "Tokyo", "Osaka"), ("Germany", "Berlin", "Munich"), ("France", "Paris", "Lyon"),
    ("Italy", "Rome", "Milan"), ("Spain", "Madrid", "Barcelona"), ("Morocco", "Rabat", "Casablanca"),
    ("New Zealand", "Wellington", "Auckland"), ("Vietnam", "Hanoi", "Ho Chi Minh City"),
    ("Kazakhstan", "Astana", "Almaty"), ("Tanzania", "Dodoma", "Dar es Salaam"), ("Egypt", "Cairo", "Alexandria"),
    ("Kenya", "Nairobi", "Mombasa"), ("Argentina", "Buenos Aires", "Cordoba"), ("Chile", "Santiago", "Valparaiso"),
    ("Peru", "Lima", "Cusco"), ("Colombia", "Bogota", "Medellin"), ("Mexico", "Mexico City", "Guadalajara"),
    ("Russia", "Moscow", "Saint Petersburg"), ("Poland", "Warsaw", "Krakow"), ("Portugal", "Lisbon", "Porto"),
    ("Greece", "Athens", "Thessaloniki"), ("Sweden", "Stockholm", "Gothenburg"), ("Norway", "Oslo", "Bergen"),
    ("Finland", "Helsinki", "Tampere"), ("Ireland", "Dublin", "Cork"), ("South Korea", "Seoul", "Busan"),
    ("Thailand", "Bangkok", "Chiang Mai"), ("Ghana", "Accra", "Kumasi"), ("Saudi Arabia", "Riyadh", "Jeddah"),
    ("Austria", "Vienna", "Salzburg"), ("Hungary", "Budapest", "Debrecen"), ("Czechia", "Prague", "Brno"),
    ("Ecuador", "Quito", "Guayaquil"), ("Scotland", "Edinburgh", "Glasgow"), ("Iran", "Tehran", "Isfahan"),
)


def _capital(rng: random.Random) -> Task:
    country, capital, other = rng.choice(CAPITALS)
    far = rng.choice([c for _, c, _ in CAPITALS if c != capital])
    question = rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?",
                           f"I'm writing a report on {country}. What is its capital city?",
                           f"Name the capital city of {country}."])
    return Task("capital", "geo", question, capital, other, far, CAPITAL_EXPLAIN,
                ["The capital of {country} is {v}.", "{v} is the capital of {country}."],
                ["So the capital of {country} is {v}.", "That makes {v} the capital of {country}."],
                f"the capital of {country}", {"country": country})


ELEMENTS = (  # name, symbol, a plausible wrong symbol
    ("sodium", "Na", "So"), ("potassium", "K", "P"), ("iron", "Fe", "Ir"), ("gold", "Au", "Ag"),
    ("silver", "Ag", "Si"), ("lead", "Pb", "Le"), ("tin", "Sn", "Ti"), ("copper", "Cu", "Co"),
    ("mercury", "Hg", "Me"), ("helium", "He", "H"), ("carbon", "C", "Ca"), ("nitrogen", "N", "Ni"),
    ("oxygen", "O", "Ox"), ("chlorine", "Cl", "C"), ("calcium", "Ca", "C"), ("magnesium", "Mg", "Mn"),
    ("zinc", "Zn", "Z"), ("neon", "Ne", "N"), ("hydrogen", "H", "Hy"), ("sulfur", "S", "Su"),
    ("phosphorus", "P", "Ph"), ("tungsten", "W", "Tu"), ("lithium", "Li", "L"), ("aluminium", "Al", "Am"),
    ("fluorine", "F", "Fl"), ("argon", "Ar", "A"), ("nickel", "Ni", "N"), ("platinum", "Pt", "Pl"),
)


def _element(rng: random.Random) -> Task:
    element, symbol, near = rng.choice(ELEMENTS)
    far = rng.choice([s for _, s, _ in ELEMENTS if s not in (symbol, near)])
    question = rng.choice([f"What is the chemical symbol for {element}?",
                           f"Which symbol does {element} have on the periodic table?",
                           f"How do chemists write {element} in a formula?",
                           f"Quick chemistry question: what is the symbol of {element}?"])
    cap = element.capitalize()
    return Task("element", "chem", question, symbol, near, far, ELEMENT_EXPLAIN,
                ["The chemical symbol for {element} is {v}.", "{Element} has the symbol {v}."],
                ["So the symbol for {element} is {v}.", "Therefore, {element} is written as {v}."],
                f"the chemical symbol for {element}", {"element": element, "Element": cap})


def _code(rng: random.Random) -> Task:
    near_fields = {}
    kind = rng.choice(("len", "expr", "sum", "repeat", "max", "loop", "divmod", "reverse"))
    if kind == "len":
        w = rng.choice(WORDS)
        code, truth, near = f'print(len("{w}"))', len(w), len(w) + rng.choice((-1, 1))
        plain, tech = f'counts the letters in "{w}"', "len() on a str object, which returns its number of characters"
    elif kind == "expr":
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 20)
        code, truth, near = f"print({a} * {b} + {c})", a * b + c, a * (b + c)
        plain = f"multiplies {a} by {b} and then adds {c}"
        tech = f"operator precedence, which binds {a} * {b} before adding {c}"
        near_fields = dict(plain=f"adds {b} and {c} first and then multiplies by {a}",
                           tech=f"left-to-right grouping, which adds {c} to {b} before multiplying by {a}")
    elif kind == "sum":
        xs = [rng.randint(1, 20) for _ in range(rng.randint(3, 6))]
        code, truth, near = f"nums = {xs}\nprint(sum(nums))", sum(xs), sum(xs[:-1])
        plain = "adds up all the numbers in the list"
        tech = "sum() over the list, a left fold of integer addition from 0"
    elif kind == "repeat":
        s, k = rng.choice(("ab", "xy", "hi", "na", "ok", "la", "zo")), rng.randint(2, 4)
        code, truth, near = f'print("{s}" * {k})', s * k, s * (k - 1)
        plain = f'repeats "{s}" {k} times'
        tech = f"sequence repetition, where str.__mul__ concatenates {k} copies of the string"
        near_fields = dict(plain=f'repeats "{s}" {k - 1} times',
                           tech=f"sequence repetition, where str.__mul__ concatenates {k - 1} copies of the string")
        far = f"{s}{k}"
    elif kind == "max":
        xs = rng.sample(range(1, 60), rng.randint(4, 6))
        code, truth, near = f"values = {xs}\nprint(max(values))", max(xs), sorted(xs)[-2]
        plain, tech = "picks the largest number in the list", "max(), a linear scan that keeps the greatest element"
    elif kind == "loop":
        n = rng.randint(3, 12)
        code = f"total = 0\nfor i in range({n}):\n    total += i\nprint(total)"
        truth, near = n * (n - 1) // 2, n * (n + 1) // 2
        plain = f"adds the numbers from 0 up to {n - 1}"
        tech = f"an accumulation over range({n}), which yields 0 through {n - 1} and excludes the stop value"
        near_fields = dict(plain=f"adds the numbers from 0 up to {n}",
                           tech=f"an accumulation over range({n}), which yields 0 through {n} inclusive")
    elif kind == "divmod":
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        code, truth, near = f"print({a} // {b}, {a} % {b})", f"{a // b} {a % b}", f"{a // b + 1} {a % b}"
        plain = f"divides {a} by {b}, keeping the whole-number part and the remainder"
        tech = "floor division and the modulo operator, which satisfy a == (a // b) * b + a % b"
        far = f"{rng.randint(0, 9)} {a // b + rng.randint(3, 9)}"
    else:
        w = rng.choice(WORDS)
        code, truth, near = f'print("{w}"[::-1])', w[::-1], w
        plain, tech = f'writes "{w}" backwards', "extended slicing with a step of -1, which builds a reversed copy"
        far = "".join(sorted(w))
    if isinstance(truth, int):
        far = str(_far_int(rng, truth, near))
    question = rng.choice([f"What does this Python code print?\n\n```python\n{code}\n```",
                           f"What is the output of the following code?\n```python\n{code}\n```",
                           f"I ran this snippet:\n\n```python\n{code}\n```\n\nWhat will it print?",
                           f"Can you tell me what this prints?\n```\n{code}\n```"])
    return Task("code", "code", question, str(truth), str(near), far, CODE_EXPLAIN,
                ["The code prints {v}.", "The output is {v}.", "This prints {v}."],
                ["So the output is {v}.", "Therefore, the program prints {v}."],
                "the output of a short Python program", {"plain": plain, "tech": tech}, value_fmt="`{}`",
                near_fields=near_fields)


FAMILIES = {"arithmetic": _arithmetic, "conversion": _conversion, "capital": _capital,
            "element": _element, "code": _code}
FAMILY_WEIGHTS = {"arithmetic": 0.34, "conversion": 0.18, "capital": 0.16, "element": 0.12, "code": 0.2}


def sample_task(rng: random.Random, exclude: str | None = None) -> Task:
    names = [f for f in FAMILIES if f != exclude]
    family = rng.choices(names, [FAMILY_WEIGHTS[f] for f in names])[0]
    return FAMILIES[family](rng)


# ----------------------------------------------------------------------------- rendering

EXTRA_SENTENCES = ((0, 0), (1, 1), (2, 3), (4, 4), (5, 6))  # verbosity level -> range of extra sentences


def render(task: Task, spec: Spec, seed: int | str, other: Task | None = None) -> tuple[str, str | None]:
    """The response text for `task` built as `spec` says, and the answer value it states (None if none).

    Content draws come from one stream and the coherence disruption from another, so two specs that
    differ only in coherence give the same sentences in a different order.
    """
    rng = random.Random(f"urm-synthetic/render/{seed}/content")
    if spec.kind == "refusal":
        sents = [rng.choice(REFUSALS[min(spec.complexity, 1)])]
        if spec.verbosity >= 1:
            sents.append(rng.choice(REFUSAL_POINTERS))
        return " ".join(sents), None
    if spec.kind == "off_topic":
        if other is None:
            raise ValueError("an off_topic spec needs `other`, the task whose answer is given instead")
        task, value = other, other.truth
    else:
        value = {"correct": task.truth, "false_claim": task.truth,
                 "near_miss": task.near, "wrong": task.far}[spec.outcome]
    fmt = dict(task.fields, v=task.value_fmt.format(value))
    if spec.kind == "answer" and spec.outcome == "near_miss":
        fmt.update(task.near_fields)
    fmt.setdefault("unit", "")
    answer_first = rng.random() < 0.4
    answer = rng.choice(task.answers_first if answer_first else task.answers_last).format(**fmt)
    explanation = rng.choice(task.explain[spec.complexity]).format(**fmt)
    n_extra = rng.randint(*EXTRA_SENTENCES[spec.verbosity])
    n_elab = (n_extra + 1) // 2
    elabs = rng.sample(ELABORATIONS[task.domain][spec.complexity], n_elab)
    fillers = set(rng.sample(("open", "restate", "close"), n_extra - n_elab))
    sents = []
    if "open" in fillers:
        sents.append(rng.choice(OPEN_FILLERS))
    if "restate" in fillers:
        sents.append(rng.choice(RESTATEMENTS).format(topic=task.topic))
    sents += [answer, explanation] if answer_first else [explanation, answer]
    sents += elabs
    if spec.kind == "answer" and spec.outcome == "false_claim":
        sents.append(rng.choice(FALSE_CLAIMS))
    if "close" in fillers:
        sents.append(rng.choice(CLOSE_FILLERS))
    sents = _disrupt(sents, spec.coherence, random.Random(f"urm-synthetic/render/{seed}/coherence"))
    return " ".join(sents), value


def _disrupt(sents: list[str], coherence: int, rng: random.Random) -> list[str]:
    """Coherence 4: as is; 3: one non-sequitur; 2: shuffled; 1: shuffled + one; 0: shuffled + two + a repeat."""
    sents = list(sents)
    if coherence <= 2:
        shuffled = sents[:]
        rng.shuffle(shuffled)
        if shuffled == sents:  # make sure the order really changes
            shuffled = sents[1:] + sents[:1]
        sents = shuffled
    n_odd = {4: 0, 3: 1, 2: 0, 1: 1, 0: 2}[coherence]
    for odd in rng.sample(NON_SEQUITURS, n_odd):
        sents.insert(rng.randint(1, len(sents)), odd)
    if coherence == 0:
        sents.insert(rng.randint(0, len(sents)), rng.choice(sents))
    return sents


# ----------------------------------------------------------------------------- rows


GREETINGS = (("Hi, can you help me with a few questions?", "Of course! What would you like to know?"),
             ("I have some homework questions.", "Sure, go ahead and ask."),
             ("Hello! I need some help.", "Happy to help. What is your question?"))
PREFIXES = ("", "", "", "", "Quick question: ", "Hi! ", "Please help: ")
SUFFIXES = ("", "", "", " Thanks!", " Please explain your answer.")


def _prompt(task: Task, rng: random.Random, seed: str) -> str:
    question = rng.choice(PREFIXES) + task.question + rng.choice(SUFFIXES)
    r = rng.random()
    if r < 0.08:
        user, assistant = rng.choice(GREETINGS)
        return f"{user}{TURN_ASSISTANT}{assistant}{TURN_USER}{question}"
    if r < 0.16:
        prev = sample_task(rng)
        spec = Spec("answer", "correct", 4, rng.randint(0, 4), rng.randint(0, 1))
        text, _ = render(prev, spec, f"{seed}/previous")
        return f"{prev.question}{TURN_ASSISTANT}{text}{TURN_USER}{question}"
    return question


def _rating_item(i: int, seed: int) -> tuple[dict, dict]:
    """One HelpSteer2 record and what it was built from (family, spec, true and stated answers)."""
    key = f"ratings/{seed}/{i}"
    rng = random.Random(f"urm-synthetic/{key}")
    task = sample_task(rng)
    spec = sample_spec(rng)
    other = sample_task(rng, exclude=task.family) if spec.kind == "off_topic" else None
    response, stated = render(task, spec, key, other)
    record = {"prompt": _prompt(task, rng, key), "response": response, **labels_for(spec)}
    return record, {"family": task.family, "spec": spec, "truth": task.truth, "stated": stated}


def helpsteer2_records(n: int, seed: int = 0) -> list[dict]:
    """n rows in HelpSteer2's schema: prompt, response and five int labels (0-4). Row i does not depend on n."""
    return [_rating_item(i, seed)[0] for i in range(n)]


def make_ratings(n: int, seed: int = 0) -> list[RatingRow]:
    """The rows of `helpsteer2_records(n, seed)` as RatingRows (multi-turn prompts split into turns)."""
    rows = []
    for i, rec in enumerate(helpsteer2_records(n, seed)):
        messages = split_helpsteer2_prompt(rec["prompt"]) + [{"role": "assistant", "content": rec["response"]}]
        rows.append(RatingRow(f"synthetic-ratings-s{seed}-{i}", messages, [float(rec[a]) for a in ATTRIBUTES]))
    return rows


def _pair_specs(subset: str, rng: random.Random) -> tuple[Spec, Spec]:
    base = Spec("answer", "correct", coherence=4, complexity=rng.randint(0, 4), verbosity=rng.randint(1, 3))
    if subset == "correctness":
        base = replace(base, coherence=rng.choice((3, 4)))
        return base, replace(base, outcome=rng.choice(("false_claim", "near_miss", "wrong")))
    if subset == "coherence":
        base = replace(base, coherence=rng.choice((3, 4)))
        return base, replace(base, coherence=rng.randint(0, base.coherence - 1))
    if subset == "verbosity":
        a, b = rng.sample(range(5), 2)
        return replace(base, verbosity=a), replace(base, verbosity=b)
    if rng.random() < 0.5:
        return base, Spec("refusal", "correct", 4, rng.randint(0, 1), rng.randint(0, 1))
    return base, replace(base, kind="off_topic")


def make_preferences(n: int, seed: int = 0) -> list[PreferencePair]:
    """n pairs of responses to one prompt that differ in one driver (the subset); chosen = higher `true_reward`."""
    pairs = []
    for i in range(n):
        key = f"pairs/{seed}/{i}"
        rng = random.Random(f"urm-synthetic/{key}")
        subset = rng.choice(SUBSETS)
        task = sample_task(rng)
        other = sample_task(rng, exclude=task.family)
        messages = split_helpsteer2_prompt(_prompt(task, rng, key))
        spec_a, spec_b = _pair_specs(subset, rng)
        reward_a, reward_b = true_reward(labels_for(spec_a)), true_reward(labels_for(spec_b))
        if reward_a == reward_b:  # every driver changes the reward, by construction: a tie is a bug here
            raise RuntimeError(f"synthetic pair {key}: {spec_a} and {spec_b} have the same true reward")
        if reward_b > reward_a:
            spec_a, spec_b, reward_a, reward_b = spec_b, spec_a, reward_b, reward_a
        chosen, _ = render(task, spec_a, key, other)
        rejected, _ = render(task, spec_b, key, other)
        pairs.append(PreferencePair(
            f"synthetic-pairs-s{seed}-{i}",
            messages + [{"role": "assistant", "content": chosen}],
            messages + [{"role": "assistant", "content": rejected}],
            subset=subset, margin=round(reward_a - reward_b, 6)))
    return pairs


def write_helpsteer2_jsonl(path: str | os.PathLike, n: int, seed: int = 0) -> Path:
    """Write `helpsteer2_records(n, seed)` as JSON lines, atomically (pipeline.atomic)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in helpsteer2_records(n, seed):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    return atomic_write(path, write)
