"""The embedded alignment task: sort the digits of the prompt. The "environment" of the LLM scripts.

Every LLM script in this repository runs offline on this task by default, so an algorithm can be run and read
in minutes on a laptop, with a *known* gold reward to judge it by (the role a held-out gold reward model plays
in the papers). What it builds, deterministically from `SortTaskConfig.seed`:

- prompts  `sort: 7 3 9 1 =`  whose ideal response is ` 1 3 7 9` followed by EOS;
- `gold_reward(prompts, responses)`: graded in [0, 1], optimum 1.0 = the sorted digits, exactly;
- a base policy pi0 ("the pretrained model"): a tiny GPTNeoX trained on well-formatted but *unaligned*
  responses (random permutations of the prompt's digits), saved with `save_pretrained` next to a word-level
  tokenizer made with `tokenizers`, so `AutoModelForCausalLM/AutoTokenizer.from_pretrained(dir)` load it. The
  default knobs' pi0 ships beside this file (`sort_task_pi0/`), so the default task is the same on every machine;
  any other is built on first use and cached;
- demonstrations (`prompt`/`completion`) from an imperfect expert: a share `demo_flaw` carries one systematic
  flaw (the largest digit written first, the rest sorted) and a share `demo_noise` has two random digits swapped;
- preferences (`prompt`/`chosen`/`rejected`) over two pi0 samples, labelled by a noisy Bradley-Terry "human":
  P(a preferred) = sigmoid((gold(a) - gold(b)) / pref_temperature);
- held-out eval prompts and held-out preference pairs.

The datasets are `datasets.Dataset`s in the same formats the scripts read from the hub, so one code path
serves both. Nothing here is tuned to favour a method: the knobs are what the papers' experiments vary.
"""

import contextlib
import glob
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch

TASK_VERSION = 1  # bump when the construction changes, so stale caches are not reused
# The default knobs' pi0, shipped: the exact weights behind every published figure. Built anew it would differ in its
# low bits from one CPU make to another (the vector width changes the order of the float sums), and so would every
# figure downstream. The digests catch a missing folder, a Git LFS pointer or a truncated copy.
SHIPPED_PI0 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sort_task_pi0")
SHIPPED_PI0_SHA256 = {
    "config.json": "fb064e79b932cb2340f87d8997a89d18ddea9483966d5f0ad9657d3cc456de8d",
    "generation_config.json": "f2d764a3f6046977f001d412ea0bff00c979fa4264e686006b80c75137203767",
    "model.safetensors": "572ba06a5a639612266dec207570df291c7c7d30167ae5338268e5c6a3147496",
    "tokenizer.json": "d452230f575355dda7685eae3068cd0f9e49f9c995aeca4986216ff0aa3b718e",
    "tokenizer_config.json": "b4eb7c115c9f545ccd695639ae53363f4e0229d8803a5e6b7c966308e19d20cd",
}
# Any other pi0 is built on this many threads whatever the caller's count (the thread count also changes the float
# sums, so a test worker and a script would build different models); one thread, since two beside one busy process
# wait on each other and run several times slower than one.
BUILD_THREADS = 1
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
PROMPT_PREFIX, PROMPT_SUFFIX = "sort:", "="


@dataclass
class SortTaskConfig:
    """Knobs of the embedded digit-sorting task (every LLM script exposes them as --task.<field>)."""

    seed: int = 0
    """seed of everything the task builds (pi0, prompts, demos, preferences)"""
    num_demos: int = 2000
    """number of demonstrations (prompt, expert completion)"""
    num_prefs: int = 500
    """number of training preference pairs (prompt, chosen, rejected)"""
    demo_noise: float = 0.1
    """share of demonstrations with two random digits swapped (random corruption)"""
    demo_flaw: float = 0.6
    """share of demonstrations with a systematic flaw: the largest digit first, then the rest sorted"""
    pref_temperature: float = 0.1
    """temperature of the Bradley-Terry labeller on gold-reward differences (0 = noiseless)"""
    num_eval_prompts: int = 256
    """held-out prompts for the gold-reward evaluation"""
    num_eval_prefs: int = 256
    """held-out preference pairs for preference accuracy"""
    min_digits: int = 4
    """fewest digits in a prompt"""
    max_digits: int = 7
    """most digits in a prompt"""
    num_symbols: int = 10
    """digits are drawn from 0 .. num_symbols-1 (at most 10)"""
    base_model_steps: int = 600
    """training steps of the base policy pi0 on unaligned (randomly permuted) responses"""
    cache_dir: str = "~/.cache/aihf"
    """where the built base model is cached (keyed by the knobs that shape it)"""


# The valid interval of every numeric knob ("(" excludes the end); checked before anything is built.
RANGES = {
    "seed": "[0, inf)", "num_demos": "[0, 1e6]", "num_prefs": "[0, 1e6]", "demo_noise": "[0, 1]", "demo_flaw": "[0, 1]",
    "pref_temperature": "[0, 1e3]", "num_eval_prompts": "[1, 1e5]", "num_eval_prefs": "[0, 1e5]", "min_digits": "[1, 32]",
    "max_digits": "[1, 32]", "num_symbols": "[1, 10]", "base_model_steps": "[0, 1e6]",
}


def validate(cfg: SortTaskConfig) -> None:
    """One-line errors (ValueError) for impossible task settings, raised before anything is built."""
    for name, interval in RANGES.items():
        value = getattr(cfg, name)
        low, high = (float(end) for end in interval[1:-1].split(","))
        if not ((low <= value if interval[0] == "[" else low < value) and (value <= high if interval[-1] == "]" else value < high)):
            raise ValueError(f"--task.{name} must be in {interval} (got {value})")  # NaN fails too
    if cfg.min_digits > cfg.max_digits:
        raise ValueError(f"--task.min_digits {cfg.min_digits} must be <= --task.max_digits {cfg.max_digits}")
    if cfg.demo_noise + cfg.demo_flaw > 1:
        raise ValueError("--task.demo_noise + --task.demo_flaw must be <= 1 (they are shares of the demonstrations)")
    if uses_shipped_pi0(cfg):
        check_shipped_pi0()


# ----------------------------------------------------------------------------------------------------------
# Text format and the gold reward
# ----------------------------------------------------------------------------------------------------------
def format_prompt(digits):
    return " ".join([PROMPT_PREFIX, *map(str, digits), PROMPT_SUFFIX])


def format_response(digits):
    return " " + " ".join(map(str, digits))


def parse_prompt(prompt: str):
    words = prompt.split()
    return [int(w) for w in words[1:-1]]


def _to_padded(rows, fill):
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def gold_reward(prompts, responses) -> torch.Tensor:
    """Gold reward in [0, 1] of each response (text before EOS) to its prompt; 1.0 iff it is the sorted digits.

    gold = (share of the prompt's digits reproduced, as a multiset, over max(len prompt, len response))
         * (share of the response's digit pairs i < j that are in order, y_i <= y_j).
    Both factors give partial credit, so the reward is graded: a random permutation of the prompt scores about
    0.5, "largest digit first, rest sorted" scores 1 - 2/n. Words that are not digits count as wrong digits.
    """
    prompt_rows = [parse_prompt(p) for p in prompts]
    response_rows = [[int(w) if w.isdigit() and len(w) == 1 else -1 for w in r.split()] for r in responses]
    x, y = _to_padded(prompt_rows, -2), _to_padded(response_rows, -3)  # distinct pad values never match
    n_x = torch.tensor([len(r) for r in prompt_rows])
    n_y = torch.tensor([len(r) for r in response_rows])
    # Multiset overlap: sum over digit values of min(count in prompt, count in response).
    values = torch.arange(10)
    count_x = (x[:, :, None] == values).sum(1)
    count_y = (y[:, :, None] == values).sum(1)
    overlap = torch.minimum(count_x, count_y).sum(1)
    multiset = overlap / torch.maximum(n_x, n_y).clamp(min=1)
    # Pairwise order: among valid pairs i < j of the response, the share with y_i <= y_j (invalid words fail).
    width = y.shape[1]
    upper = torch.ones(width, width, dtype=torch.bool).triu(1)
    inside = torch.arange(width)[None, :] < n_y[:, None]
    pairs = upper & inside[:, :, None] & inside[:, None, :]
    valid = y >= 0
    ordered = (y[:, :, None] <= y[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    num_pairs = pairs.sum((1, 2))
    # A response of fewer than two words has no pairs: its order factor is 1 if its word is a digit. Padding
    # columns are excluded, or a one-word response would score 0 next to a longer one in the same batch.
    no_pairs_order = (valid | ~inside).all(1).float()
    order = torch.where(num_pairs > 0, (ordered & pairs).sum((1, 2)) / num_pairs.clamp(min=1), no_pairs_order)
    return (multiset * order).float()


# ----------------------------------------------------------------------------------------------------------
# Sampling the data
# ----------------------------------------------------------------------------------------------------------
def _sample_digits(rng: random.Random, cfg: SortTaskConfig):
    return [rng.randrange(cfg.num_symbols) for _ in range(rng.randint(cfg.min_digits, cfg.max_digits))]


def expert_completion(rng: random.Random, digits, cfg: SortTaskConfig):
    """The imperfect demonstrator: sorted, except for a systematic flaw or a random swap."""
    out = sorted(digits)
    u = rng.random()
    if u < cfg.demo_flaw:  # systematic: the largest digit is written first
        out = [out[-1]] + out[:-1]
    elif u < cfg.demo_flaw + cfg.demo_noise:  # random: two positions swapped
        i, j = rng.sample(range(len(out)), 2) if len(out) > 1 else (0, 0)
        out[i], out[j] = out[j], out[i]
    return out


def _prompts(rng, cfg, n):
    return [format_prompt(_sample_digits(rng, cfg)) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------
# The base policy pi0 and its tokenizer
# ----------------------------------------------------------------------------------------------------------
def build_tokenizer(cfg: SortTaskConfig):
    """A word-level tokenizer over the task's words, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL_TOKENS + [PROMPT_PREFIX, PROMPT_SUFFIX] + [str(d) for d in range(10)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", model_max_length=128,
        model_input_names=["input_ids", "attention_mask"],  # transformers 4 would add token_type_ids, which generate refuses
    )


def _pi0_knobs(cfg: SortTaskConfig) -> dict:
    """The knobs that shape pi0 (the data knobs do not)."""
    return dict(seed=cfg.seed, min_digits=cfg.min_digits, max_digits=cfg.max_digits, num_symbols=cfg.num_symbols,
                steps=cfg.base_model_steps)


def uses_shipped_pi0(cfg: SortTaskConfig) -> bool:
    return _pi0_knobs(cfg) == _pi0_knobs(SortTaskConfig())


def check_shipped_pi0() -> None:
    """ValueError unless every file of the shipped pi0 is there with its recorded SHA-256 (a copy without the folder,
    a Git LFS pointer or a truncated download would otherwise load, or fail, far from the cause)."""
    for name, digest in SHIPPED_PI0_SHA256.items():
        path = os.path.join(SHIPPED_PI0, name)
        if not os.path.isfile(path):
            raise ValueError(f"the embedded task's base model {path} is missing: copy the sort_task_pi0/ folder beside "
                             "sort_task.py (or change a --task knob that shapes pi0, e.g. --task.seed, to build one)")
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                raise ValueError(f"{path} does not match its SHA-256: restore it with `git checkout -- sort_task_pi0` "
                                 "(a changed pi0 would change every figure)")


def _base_model_key(cfg: SortTaskConfig) -> str:
    shape = dict(version=TASK_VERSION, threads=BUILD_THREADS, **_pi0_knobs(cfg))
    return hashlib.sha1(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _threads(n: int):
    """Run the block on n torch threads, then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    if torch.get_num_threads() != n:  # a torch whose thread pool is fixed once it has run
        print(f"[sort_task] warning: running on {torch.get_num_threads()} threads, not {n}: a pi0 built here may differ "
              "from one built elsewhere", flush=True)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_base_model(cfg: SortTaskConfig, tokenizer, out_dir: str) -> None:
    """Pretrain pi0 on well-formatted, unaligned responses: a random permutation of the prompt's digits + EOS."""
    from tqdm.auto import tqdm
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(cfg.seed)
    rng = random.Random(f"base-model-{cfg.seed}")
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=2 * cfg.max_digits + 8, rotary_pct=0.25,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = GPTNeoXForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
    for _ in tqdm(range(cfg.base_model_steps), desc="[sort_task] pi0", disable=not sys.stderr.isatty(), leave=False):
        rows, masks = [], []
        for _ in range(64):
            digits = _sample_digits(rng, cfg)
            prompt = tokenizer(format_prompt(digits))["input_ids"]
            response = tokenizer(format_response(rng.sample(digits, len(digits))))["input_ids"] + [tokenizer.eos_token_id]
            rows.append(prompt + response)
            masks.append([0] * len(prompt) + [1] * len(response))
        ids = _to_padded(rows, tokenizer.pad_token_id)
        loss_mask = _to_padded(masks, 0).bool()
        attention = _to_padded([[1] * len(r) for r in rows], 0)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        labels = ids[:, 1:].masked_fill(~loss_mask[:, 1:], -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def base_model_path(cfg: SortTaskConfig) -> str:
    """Directory of pi0 + tokenizer. The default knobs' pi0 ships beside this file; any other is built on first use
    (≈ 1 minute), one build at a time per cache folder, and cached."""
    if uses_shipped_pi0(cfg):  # its files were checked by validate()
        return SHIPPED_PI0
    from filelock import FileLock  # a dependency of transformers

    root = os.path.expanduser(cfg.cache_dir)
    final = os.path.join(root, f"sort_task_pi0_{_base_model_key(cfg)}")
    if os.path.exists(os.path.join(final, "config.json")):
        return final
    os.makedirs(root, exist_ok=True)
    lock = FileLock(os.path.join(root, ".build.lock"))
    try:
        lock.acquire(timeout=0)
    except TimeoutError:  # filelock's Timeout subclasses it
        print(f"[sort_task] waiting for another process that is building a pi0 in {root} ...", flush=True)
        lock.acquire()
    try:
        if os.path.exists(os.path.join(final, "config.json")):  # the process we waited for built this one
            return final
        # Holding the lock, no build is under way here: any half-built folder is a killed build's.
        for stale in glob.glob(os.path.join(root, ".building_*")):
            shutil.rmtree(stale, ignore_errors=True)
        print(f"[sort_task] building the base policy pi0 in {final} (once; cached) ...", flush=True)
        building = tempfile.mkdtemp(prefix=".building_", dir=root)
        try:
            with _threads(BUILD_THREADS):
                _train_base_model(cfg, build_tokenizer(cfg), building)
            os.rename(building, final)  # atomic publish
        finally:
            shutil.rmtree(building, ignore_errors=True)
    finally:
        lock.release()
    return final


# ----------------------------------------------------------------------------------------------------------
# Sampling from a model (used to draw the pi0 pairs that the "human" labels)
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_responses(model, tokenizer, prompts, max_new_tokens, do_sample=True, batch_size=256, seed=0, synced_gpus=False):
    """Responses (text before the first EOS) of a causal LM to the prompts, with the KV cache. synced_gpus: the model's
    forward passes need every process (FSDP2), so one whose responses have all ended keeps stepping with the others."""
    from transformers import GenerationConfig

    generation = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=1.0 if do_sample else None,
        top_k=0 if do_sample else None, top_p=1.0 if do_sample else None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out = []
    cuda = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # seeded sampling that leaves the caller's RNG state alone
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
            ids = model.generate(**batch, generation_config=generation, synced_gpus=synced_gpus)
            out += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    tokenizer.padding_side = padding_side
    return [" " + r.strip() for r in out]


# ----------------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------------
class SortTask:
    """Everything a script needs: pi0's path, the datasets, the eval prompts and the gold reward."""

    def __init__(self, cfg: SortTaskConfig):
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        validate(cfg)
        self.cfg = cfg
        self.max_response_tokens = cfg.max_digits + 2  # room for the digits, EOS and one mistake
        self.model_path = base_model_path(cfg)
        rng = random.Random(f"data-{cfg.seed}")  # separate stream: data do not depend on how pi0 was built
        demo_digits = [_sample_digits(rng, cfg) for _ in range(cfg.num_demos)]
        self.demos = Dataset.from_dict({
            "prompt": [format_prompt(d) for d in demo_digits],
            "completion": [format_response(expert_completion(rng, d, cfg)) for d in demo_digits],
        })
        self.eval_prompts = _prompts(rng, cfg, cfg.num_eval_prompts)
        pref_prompts = _prompts(rng, cfg, cfg.num_prefs + cfg.num_eval_prefs)

        # Preference pairs: two samples of pi0 per prompt, labelled by a noisy Bradley-Terry labeller.
        model = AutoModelForCausalLM.from_pretrained(self.model_path)
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        doubled = [p for p in pref_prompts for _ in range(2)]
        with _threads(BUILD_THREADS):  # the same float sums, so the same samples, in every process
            samples = sample_responses(model, tokenizer, doubled, self.max_response_tokens, seed=cfg.seed)
        a, b = samples[0::2], samples[1::2]
        margin = gold_reward(pref_prompts, a) - gold_reward(pref_prompts, b)
        if cfg.pref_temperature > 0:
            p_a = torch.sigmoid(margin / cfg.pref_temperature)
        else:
            p_a = (margin > 0).float() + 0.5 * (margin == 0).float()
        draws = torch.tensor([rng.random() for _ in pref_prompts])
        a_wins = (draws < p_a).tolist()
        chosen = [x if w else y for x, y, w in zip(a, b, a_wins)]
        rejected = [y if w else x for x, y, w in zip(a, b, a_wins)]
        pairs = Dataset.from_dict({"prompt": pref_prompts, "chosen": chosen, "rejected": rejected})
        self.prefs = pairs.select(range(cfg.num_prefs))
        self.eval_prefs = pairs.select(range(cfg.num_prefs, len(pairs)))

    @staticmethod
    def gold_reward(prompts, responses) -> torch.Tensor:
        return gold_reward(prompts, responses)

    @torch.no_grad()
    def evaluate(self, model, tokenizer, seed=0, synced_gpus=False) -> dict:
        """The contract's eval: mean gold reward of sampled (temperature 1) and greedy responses to the
        held-out prompts."""
        prompts = self.eval_prompts
        sampled = sample_responses(model, tokenizer, prompts, self.max_response_tokens, do_sample=True, seed=seed,
                                   synced_gpus=synced_gpus)
        greedy = sample_responses(model, tokenizer, prompts, self.max_response_tokens, do_sample=False, synced_gpus=synced_gpus)
        return {"gold_reward": gold_reward(prompts, sampled).mean().item(),
                "gold_reward_greedy": gold_reward(prompts, greedy).mean().item()}
