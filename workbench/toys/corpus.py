"""A synthetic pretraining corpus of factual and procedural documents, with queries about both.

The corpus mirrors, at toy scale, the two kinds of knowledge Ruis et al. (arXiv 2411.12580) traced with
influence functions (docs/probes.md, "Influence"):

- **factual documents** state one attribute of one made-up entity, in one of several wordings
  (``the color of vorbi is teal .``, ``q : what is the color of vorbi ? a : teal .`` ...). Each fact is
  stated by a few documents in different wordings; the question wording is always among them, so a model
  that memorized the corpus can answer the factual queries.
- **procedural documents** are worked examples of a multi-step procedure with varying numbers and
  wording: two-step arithmetic ``( a + b ) * c`` (task ``arith``) and the slope between two points
  (task ``slope``).

Queries are (prompt, completion) pairs. A factual query asks the question wording and its completion is the
attribute's value; a reasoning query states a problem with numbers that no document uses (the combination is
held out; each single step, such as ``5 + 3 = 8``, does occur in other documents) and its completion is the
worked solution in the task's first wording, ending with the answer.

Everything is generated from :class:`CorpusConfig` with a seeded generator, so the same config gives the same
corpus, token for token. The tokenizer is word-level (whitespace-separated words; every number the tasks
can produce is one token), small enough to read and with no unknown-word fallback: a word outside the
vocabulary is an error.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import polars as pl

from workbench.errors import InputError
from workbench.samples import SampleSet

PAD, BOS = "<pad>", "<bos>"

# Values of each attribute; entities draw one value per attribute, so a value is shared by several entities
# and a document that merely mentions the answer word is not necessarily about the queried entity.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "teal", "amber", "violet", "gray", "ivory"),
    "city": ("paris", "lima", "oslo", "cairo", "dakar", "quito", "hanoi", "perth"),
    "food": ("rice", "figs", "beans", "bread", "soup", "honey", "plums", "nuts"),
    "sport": ("chess", "rugby", "tennis", "golf", "polo", "judo", "rowing", "skiing"),
}

# Factual wordings; "q" is the question wording that factual queries use (it is always among a fact's documents).
FACT_WORDINGS: dict[str, str] = {
    "q": "q : what is the {attr} of {e} ? a : {v} .",
    "plain": "the {attr} of {e} is {v} .",
    "has": "{e} has {v} as its {attr} .",
    "known": "everyone knows that the {attr} of {e} is {v} .",
}

# Procedural wordings. Fields: the problem's numbers and every intermediate result. The first wording of each
# task is the one reasoning queries use; "|" splits its problem statement (the prompt) from the worked
# solution (the completion).
PROC_WORDINGS: dict[str, tuple[str, ...]] = {
    "arith": (
        "compute ( {a} + {b} ) * {c} . | first {a} + {b} = {s} . then {s} * {c} = {r} . the answer is {r} .",
        "what is ( {a} + {b} ) * {c} ? add {a} and {b} to get {s} . multiply {s} by {c} to get {r} . so {r} .",
        "to find ( {a} + {b} ) * {c} we add : {a} + {b} = {s} , and multiply : {s} * {c} = {r} . answer : {r} .",
    ),
    "slope": (
        "slope through ( {x1} , {y1} ) and ( {x2} , {y2} ) . | rise {y2} - {y1} = {dy} . run {x2} - {x1} = {dx} . "
        "slope {dy} / {dx} = {m} .",
        "find the slope from ( {x1} , {y1} ) to ( {x2} , {y2} ) . the change in y is {y2} - {y1} = {dy} . the change "
        "in x is {x2} - {x1} = {dx} . so the slope is {dy} / {dx} = {m} .",
        "points ( {x1} , {y1} ) , ( {x2} , {y2} ) : dy = {y2} - {y1} = {dy} , dx = {x2} - {x1} = {dx} , "
        "m = {dy} / {dx} = {m} .",
    ),
}
TASKS = tuple(PROC_WORDINGS)

_SYLLABLES = ("ka", "lo", "mi", "ru", "ve", "zo", "ti", "ne", "bu", "sa", "do", "fi", "ga", "pe", "xu", "wo")


@dataclass(frozen=True)
class CorpusConfig:
    """Settings of the synthetic corpus. Defaults are the full built-in corpus (about 890 documents)."""

    seed: int = 0
    n_entities: int = 32
    attributes: tuple[str, ...] = ("color", "city", "food")
    docs_per_fact: int = 3  # wordings per fact, the question wording always among them
    procedural_per_task: int = 300
    tasks: tuple[str, ...] = TASKS
    n_factual_queries: int = 12
    n_reasoning_queries: int = 6  # per task
    # number ranges of the procedures (every intermediate result stays within the vocabulary)
    arith_ab: tuple[int, int] = (1, 5)
    arith_c: tuple[int, int] = (2, 3)
    slope_x: tuple[int, int] = (0, 4)
    slope_y: tuple[int, int] = (0, 5)
    slope_dx: tuple[int, int] = (1, 2)
    slope_m: tuple[int, int] = (1, 3)

    def __post_init__(self) -> None:
        bad = [a for a in self.attributes if a not in ATTRIBUTES]
        if bad:
            raise InputError(f"unknown attributes {bad}; choose from {list(ATTRIBUTES)}")
        bad = [t for t in self.tasks if t not in PROC_WORDINGS]
        if bad:
            raise InputError(f"unknown procedural tasks {bad}; choose from {list(PROC_WORDINGS)}")
        if not 1 <= self.docs_per_fact <= len(FACT_WORDINGS):
            raise InputError(f"docs_per_fact must be 1 to {len(FACT_WORDINGS)} (one per wording)")
        if self.n_entities > len(_SYLLABLES) ** 3:
            raise InputError(f"at most {len(_SYLLABLES) ** 3} entities")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CorpusConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary: id 0 is padding, id 1 begins every text.

    Called like a Hugging Face tokenizer (``tok(text)["input_ids"]``, ``add_special_tokens=False`` leaves the
    begin token out), so :meth:`workbench.samples.SampleSet.from_prompt_completion` takes it.
    """

    def __init__(self, words: Sequence[str]):
        self.vocab = [PAD, BOS] + [w for w in dict.fromkeys(words) if w not in (PAD, BOS)]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_token_id, self.bos_token_id = 0, 1

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        words = text.split()
        unknown = sorted({w for w in words if w not in self.index})
        if unknown:
            raise InputError(
                f"words {unknown[:5]} are not in the corpus vocabulary of {len(self.vocab)} words; write queries "
                "with the corpus's words (tokenizer.vocab lists them) and numbers within the tasks' ranges"
            )
        return ([self.bos_token_id] if add_special_tokens else []) + [self.index[w] for w in words]

    def __call__(self, text: str, add_special_tokens: bool = True, **_) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.vocab):
                raise InputError(f"token id {i} is outside the vocabulary of {len(self.vocab)}")
            if skip_special_tokens and i in (self.pad_token_id, self.bos_token_id):
                continue
            out.append(self.vocab[i])
        return " ".join(out)

    def tokens(self, ids: Sequence[int]) -> list[str]:
        """The word of each id (special tokens included), for per-token views."""
        return [self.vocab[int(i)] for i in ids]


@dataclass
class Corpus:
    """Documents and queries as tables, with the tokenizer that encodes them.

    ``documents``: doc_id, kind (factual | procedural), task (the attribute, or the procedure), entity,
    attribute, value (facts) or answer (procedures), wording, text. ``queries``: query_id, kind (factual |
    reasoning), task, entity, attribute, prompt, completion, answer.
    """

    config: CorpusConfig
    tokenizer: WordTokenizer
    documents: pl.DataFrame
    queries: pl.DataFrame
    extra: dict = field(default_factory=dict)

    def document_samples(self) -> SampleSet:
        """Documents as language-model samples (every next token scored), grouped by kind."""
        tok = self.tokenizer
        return SampleSet.from_token_lists(
            [tok.encode(t) for t in self.documents["text"]],
            ids=self.documents["doc_id"].to_list(),
            groups=[k if k == "factual" else f"procedural:{t}" for k, t in
                    self.documents.select("kind", "task").iter_rows()],
        )

    def query_samples(self, queries: pl.DataFrame | None = None) -> SampleSet:
        """Queries as (prompt, completion) samples: only the completion's tokens are scored."""
        q = self.queries if queries is None else queries
        return SampleSet.from_prompt_completion(
            self.tokenizer, q["prompt"].to_list(), q["completion"].to_list(), ids=q["query_id"].to_list(),
            groups=[k if k == "factual" else f"reasoning:{t}" for k, t in q.select("kind", "task").iter_rows()],
        )

    def max_length(self) -> int:
        """The longest document or query, in tokens (the begin token included)."""
        docs = max(len(t.split()) for t in self.documents["text"]) + 1
        qs = max(len(p.split()) + len(c.split()) for p, c in self.queries.select("prompt", "completion").iter_rows())
        return max(docs, qs + 1)


def _range(lo_hi: tuple[int, int]) -> range:
    return range(lo_hi[0], lo_hi[1] + 1)


def _arith_problems(cfg: CorpusConfig) -> list[dict]:
    return [dict(a=a, b=b, c=c, s=a + b, r=(a + b) * c)
            for a in _range(cfg.arith_ab) for b in _range(cfg.arith_ab) for c in _range(cfg.arith_c)]


def _slope_problems(cfg: CorpusConfig) -> list[dict]:
    out = []
    for x1 in _range(cfg.slope_x):
        for dx in _range(cfg.slope_dx):
            for y1 in _range(cfg.slope_y):
                for m in _range(cfg.slope_m):
                    out.append(dict(x1=x1, y1=y1, x2=x1 + dx, y2=y1 + m * dx, dx=dx, dy=m * dx, m=m))
    return out


def _answer(task: str, p: dict) -> int:
    return p["r"] if task == "arith" else p["m"]


def _steps(task: str, p: dict) -> list[tuple[str, int, int, int]]:
    """The single steps of a worked solution as (op, x, y, result), to check that each one is taught."""
    if task == "arith":
        return [("+", p["a"], p["b"], p["s"]), ("*", p["s"], p["c"], p["r"])]
    return [("-", p["y2"], p["y1"], p["dy"]), ("-", p["x2"], p["x1"], p["dx"]), ("/", p["dy"], p["dx"], p["m"])]


def _entity_names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    seen = set()
    while len(names) < n:
        k = rng.choice((2, 3))
        name = "".join(rng.choice(_SYLLABLES) for _ in range(k))
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def make_corpus(config: CorpusConfig | None = None) -> Corpus:
    """Generate the corpus of ``config`` (default: :class:`CorpusConfig`), deterministically from its seed."""
    cfg = config or CorpusConfig()
    rng = random.Random(cfg.seed)
    docs: list[dict] = []

    # Facts: each entity gets one value per attribute.
    entities = _entity_names(rng, cfg.n_entities)
    facts = [(e, attr, rng.choice(ATTRIBUTES[attr])) for e in entities for attr in cfg.attributes]
    other = [w for w in FACT_WORDINGS if w != "q"]
    for e, attr, v in facts:
        for wording in ["q"] + rng.sample(other, cfg.docs_per_fact - 1):
            docs.append(dict(kind="factual", task=attr, entity=e, attribute=attr, value=v, answer=None,
                             wording=wording, text=FACT_WORDINGS[wording].format(attr=attr, e=e, v=v)))

    # Procedures: hold out the query problems first, then draw documents from problems whose single steps
    # are all taught elsewhere (so a held-out query is solvable by composing steps the corpus shows).
    queries: list[dict] = []
    for task in cfg.tasks:
        pool = _arith_problems(cfg) if task == "arith" else _slope_problems(cfg)
        rng.shuffle(pool)
        # Hold a problem out only while each of its steps stays in some problem that is not held out.
        uses: dict = {}
        for p in pool:
            for st in _steps(task, p):
                uses[st] = uses.get(st, 0) + 1
        held = []
        for p in pool:
            if len(held) == cfg.n_reasoning_queries * 3:
                break
            if all(uses[st] > 1 for st in _steps(task, p)):
                held.append(p)
                for st in _steps(task, p):
                    uses[st] -= 1
        train = [p for p in pool if not any(p is h for h in held)]
        # First problems that teach the held-out queries' steps, then the others, then repeats (which come
        # in other wordings), up to the count.
        need = {st for p in held for st in _steps(task, p)}
        first = []
        for p in train:
            if need & set(_steps(task, p)):
                first.append(p)
                need -= set(_steps(task, p))
        rest = [p for p in train if not any(p is f for f in first)]
        order = first + rest
        if cfg.procedural_per_task < len(first):
            raise InputError(
                f"procedural_per_task={cfg.procedural_per_task} is fewer than the {len(first)} {task} problems needed "
                "to teach the steps of the held-out queries; raise it or narrow the number ranges"
            )
        chosen = order[: cfg.procedural_per_task]
        chosen += [rng.choice(order) for _ in range(cfg.procedural_per_task - len(chosen))]
        wordings = PROC_WORDINGS[task]
        for p in chosen:
            w = rng.randrange(len(wordings))
            docs.append(dict(kind="procedural", task=task, entity=None, attribute=None, value=None,
                             answer=str(_answer(task, p)), wording=f"{task}{w}",
                             text=wordings[w].format(**p).replace(" | ", " ")))
        prompt_t, completion_t = wordings[0].split(" | ")
        for p in held:
            queries.append(dict(kind="reasoning", task=task, entity=None, attribute=None,
                                prompt=prompt_t.format(**p), completion=completion_t.format(**p),
                                answer=str(_answer(task, p))))

    # Factual queries: the question wording, asking facts spread over entities and attributes (3x as many
    # candidates as wanted, so that the trained model's correct answers can be picked from them).
    order = rng.sample(range(len(facts)), min(len(facts), cfg.n_factual_queries * 3))
    fq = []
    for i in order:
        e, attr, v = facts[i]
        prompt = FACT_WORDINGS["q"].split(" {v}")[0].format(attr=attr, e=e)
        fq.append(dict(kind="factual", task=attr, entity=e, attribute=attr, prompt=prompt, completion=v, answer=v))
    queries = fq + queries

    doc_frame = pl.DataFrame(docs, schema={
        "kind": pl.String, "task": pl.String, "entity": pl.String, "attribute": pl.String, "value": pl.String,
        "answer": pl.String, "wording": pl.String, "text": pl.String})
    doc_frame = doc_frame.with_row_index("i").select(
        (pl.lit("d") + pl.col("i").cast(pl.String).str.zfill(4)).alias("doc_id"), pl.exclude("i"))
    q_frame = pl.DataFrame(queries, schema={
        "kind": pl.String, "task": pl.String, "entity": pl.String, "attribute": pl.String, "prompt": pl.String,
        "completion": pl.String, "answer": pl.String})
    q_frame = q_frame.with_row_index("i").select(
        (pl.when(pl.col("kind") == "factual").then(pl.lit("f")).otherwise(pl.col("task").str.slice(0, 1))
         + pl.col("i").cast(pl.String).str.zfill(3)).alias("query_id"), pl.exclude("i"))

    words = [w for t in doc_frame["text"] for w in t.split()]
    words += [w for t in q_frame["prompt"].to_list() + q_frame["completion"].to_list() for w in t.split()]
    # Every value of the configured attributes and every number up to the largest the tasks produce, so
    # hand-written queries within the corpus's world encode.
    words += [v for a in cfg.attributes for v in ATTRIBUTES[a]]
    top = max(cfg.arith_ab[1] * 2 * cfg.arith_c[1], cfg.slope_y[1] + cfg.slope_m[1] * cfg.slope_dx[1],
              cfg.slope_x[1] + cfg.slope_dx[1])
    numbers = [str(i) for i in range(top + 1)]
    vocab = sorted({w for w in words if not w.isdigit()}) + numbers
    return Corpus(cfg, WordTokenizer(vocab), doc_frame, q_frame)
