"""Full fine-tuning: train every weight of the base model on the task.

Two ways to fine-tune the lab's base model for sentiment, both updating all of its weights:

* **as a language model**: train it to write the label word after the review, with the very
  prompt and label words the zero-shot metric reads (``metrics.SENTIMENT_PROMPT``), so the
  lab's ``sentiment_accuracy`` measures the result unchanged;
* **as a classifier**: put a linear head on the hidden state of the last real token, as BERT
  and transformers' ``LlamaForSequenceClassification`` do, and train it with a class loss.

Run it on any causal LM::

    python -m fieldguide.full_finetune --model tiny --steps 150
"""

import functools
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

from fieldguide.cli import (
    add_training_arguments,
    example_parser,
    main_guard,
    non_negative_float,
    parse_and_load,
)
from fieldguide.corpus import make_corpus
from fieldguide.data import IGNORE_INDEX, pack_texts, pad_batch
from fieldguide.evaluate import HELDOUT_TEXT_SEED
from fieldguide.loading import load_model, tiny_model_dir
from fieldguide.metrics import SENTIMENT_PROMPT, perplexity, sentiment_accuracy
from fieldguide.pretrain import PretrainConfig
from fieldguide.tasks import SENTIMENT_LABELS, ClassificationExample, sentiment_task
from fieldguide.training import TrainConfig, train

# -- What full fine-tuning costs in memory ----------------------------------------------------

# Bytes per parameter of mixed-precision training with Adam(W), as counted by ZeRO (section 3.1):
# the half-precision copy the forward and backward passes use, its gradient, and the optimizer
# state, kept in fp32: a master copy of the weights and Adam's two moment estimates.
BYTES_PER_PARAM = {
    "fp16 weights": 2,
    "fp16 gradients": 2,
    "fp32 master weights": 4,
    "fp32 momentum (first moment)": 4,
    "fp32 variance (second moment)": 4,
}


def training_memory_bytes(num_params: int) -> int:
    """Bytes of weights, gradients and AdamW state for full fine-tuning (activations not counted)."""
    if num_params < 1:
        raise ValueError(f"num_params must be at least 1, got {num_params}")
    return num_params * sum(BYTES_PER_PARAM.values())


# -- Variant 1: the label word as the next tokens -----------------------------------------------


@dataclass(frozen=True)  # frozen, so it can key the cache of run_causal_lm
class FullFinetuneConfig:
    max_steps: int = 150  # optimizer steps; accuracy leaves chance only after about 100
    batch_size: int = 16  # examples per step
    learning_rate: float = 1e-3  # peak AdamW rate, a third of the rate the model was pretrained at
    replay_fraction: float = 0.0  # share of the training examples that are pretraining text
    replay_block_size: int = 16  # tokens per replayed block of pretraining text
    seed: int = 0  # the order in which examples are visited

    def __post_init__(self):
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1), got {self.replay_fraction}")


def verbalized_example(tokenizer, example: ClassificationExample) -> dict:
    """The review in the zero-shot prompt, then the label word; the loss is on the label only."""
    prompt = tokenizer(SENTIMENT_PROMPT.format(text=example.text))["input_ids"]
    # Tokenized exactly as metrics.classify_sentiment scores it: a space, then the word.
    answer = tokenizer(" " + SENTIMENT_LABELS[example.label], add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def replay_blocks(tokenizer, num_blocks: int, block_size: int) -> list[dict]:
    """The first ``num_blocks`` blocks of the base model's own pretraining corpus."""
    # make_corpus draws stories one after another from one seeded generator, so the first n
    # stories of the pretraining seed are the first n stories the model was pretrained on.
    stories = make_corpus(max(1, num_blocks), seed=PretrainConfig().seed)
    return pack_texts(tokenizer, stories, block_size)[:num_blocks]  # every story fills a block


def causal_lm_training_set(tokenizer, config: FullFinetuneConfig) -> list[dict]:
    """The task's training split, plus pretraining blocks making up ``replay_fraction`` of it."""
    task = [verbalized_example(tokenizer, example) for example in sentiment_task().train]
    share = config.replay_fraction
    num_replay = round(len(task) * share / (1 - share))  # replay / (task + replay) = share
    return task + replay_blocks(tokenizer, num_replay, config.replay_block_size) if num_replay else task


@dataclass
class FinetuneResult:
    losses: list[float]  # the training loss of every optimizer step
    accuracy_before: float  # held-out sentiment accuracy of the starting model
    accuracy_after: float
    perplexity_before: float | None  # held-out perplexity on pretraining-style stories
    perplexity_after: float | None  # (None where the model is a classifier, not an LM)
    seconds: float  # wall-clock time of the training alone


def heldout_perplexity(model, tokenizer) -> float:
    """Perplexity on unseen stories of the pretraining distribution: forgetting shows here."""
    return perplexity(model, tokenizer, make_corpus(200, seed=HELDOUT_TEXT_SEED))


def finetune_causal_lm(model, tokenizer, config: FullFinetuneConfig) -> FinetuneResult:
    """Fine-tune all of ``model``'s weights in place; score it before and after."""
    heldout = sentiment_task().heldout
    accuracy, ppl = sentiment_accuracy(model, tokenizer, heldout), heldout_perplexity(model, tokenizer)
    train_config = TrainConfig(
        max_steps=config.max_steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        seed=config.seed,
    )
    start = time.perf_counter()
    dataset = causal_lm_training_set(tokenizer, config)
    losses = train(model, dataset, train_config, collate=lambda ex: pad_batch(ex, tokenizer.pad_token_id))
    seconds = time.perf_counter() - start
    return FinetuneResult(
        losses,
        accuracy,
        sentiment_accuracy(model, tokenizer, heldout),
        ppl,
        heldout_perplexity(model, tokenizer),
        seconds,
    )


@functools.cache  # a doctest and the loss-curve figure share one run instead of training twice
def run_causal_lm(config: FullFinetuneConfig = FullFinetuneConfig()) -> FinetuneResult:
    """Fine-tune a fresh copy of the tiny model with ``config``."""
    model, tokenizer = load_model("tiny")
    torch.manual_seed(config.seed)
    return finetune_causal_lm(model, tokenizer, config)


# The settings compared on the page: how fast to learn, and whether to rehearse old text.
FORGETTING_SETTINGS = {
    "lr 1e-3": FullFinetuneConfig(),
    "lr 3e-3": FullFinetuneConfig(learning_rate=3e-3),
    "lr 3e-3 + 50% replay": FullFinetuneConfig(learning_rate=3e-3, replay_fraction=0.5),
}


def plot_losses(ax) -> None:
    """The loss curves of the page's runs, with and without replay, on a matplotlib ``Axes``."""
    for name in ("lr 1e-3", "lr 3e-3 + 50% replay"):
        ax.plot(run_causal_lm(FORGETTING_SETTINGS[name]).losses, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats per target token)")
    ax.set_title("Full fine-tuning on sentiment, label words as targets")
    ax.legend()


# -- Variant 2: a classification head ---------------------------------------------------------


class SentimentClassifier(nn.Module):
    """A transformer body with a linear head on the hidden state of the last real token."""

    def __init__(self, body: nn.Module, hidden_size: int, num_labels: int = 2):
        super().__init__()
        self.model = body  # the names of LlamaForSequenceClassification: model, score
        self.score = nn.Linear(hidden_size, num_labels, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class scores (B, num_labels) from the last real token of each sequence in the batch."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, d)
        # A causal model's last real token is the only one that has read the whole review.
        # The rightmost position with mask 1 finds it under left and right padding alike.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        last = (positions * attention_mask).argmax(dim=-1)  # (B,)
        return self.score(hidden[torch.arange(len(last)), last])  # (B, num_labels)


def classifier_from_causal_lm(model, num_labels: int = 2, seed: int = 0) -> SentimentClassifier:
    """Reuse ``model``'s body; start the head as transformers does, small and random."""
    classifier = SentimentClassifier(model.model, model.config.hidden_size, num_labels)
    torch.manual_seed(seed)
    nn.init.normal_(classifier.score.weight, std=model.config.initializer_range)
    return classifier


def classification_examples(tokenizer, examples: list[ClassificationExample]) -> list[dict]:
    """The bare review (no prompt) and its class index, the layout transformers' Trainer takes."""
    return [{"input_ids": tokenizer(ex.text)["input_ids"], "labels": ex.label} for ex in examples]


def classification_batch(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the reviews into (B, T) tensors; the labels become one (B,) tensor."""
    padded = pad_batch(
        [{"input_ids": ex["input_ids"], "labels": ex["input_ids"]} for ex in examples], pad_token_id
    )
    labels = torch.tensor([ex["labels"] for ex in examples])  # (B,)
    return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"], "labels": labels}


def classification_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the classes, and the number of examples (the lab's loss API)."""
    logits = _class_logits(model, batch)  # (B, num_labels)
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), len(batch["labels"])


def _class_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return getattr(output, "logits", output)  # transformers returns an object, ours a tensor


@torch.no_grad()
def classifier_accuracy(model: nn.Module, tokenizer, examples: list[ClassificationExample]) -> float:
    """Fraction of reviews whose highest-scoring class is the right one."""
    model.eval()
    batch = classification_batch(classification_examples(tokenizer, examples), tokenizer.pad_token_id)
    batch = {key: value.to(next(model.parameters()).device) for key, value in batch.items()}
    return (_class_logits(model, batch).argmax(dim=-1) == batch["labels"]).float().mean().item()


@dataclass(frozen=True)
class ClassifierConfig:
    max_steps: int = 30  # optimizer steps; the loss is near 0 by step 20
    batch_size: int = 16  # examples per step
    learning_rate: float = 1e-3  # peak learning rate, for the body and the new head alike
    seed: int = 0  # the head's initial weights and the order of the examples


@functools.cache
def run_classifier(config: ClassifierConfig = ClassifierConfig()) -> FinetuneResult:
    """Train our classifier, body and head, on the tiny model with the lab's loop."""
    model, tokenizer = load_model("tiny")
    classifier = classifier_from_causal_lm(model, seed=config.seed)
    heldout = sentiment_task().heldout
    before = classifier_accuracy(classifier, tokenizer, heldout)
    dataset = classification_examples(tokenizer, sentiment_task().train)
    train_config = TrainConfig(
        max_steps=config.max_steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        seed=config.seed,
    )
    start = time.perf_counter()
    collate = functools.partial(classification_batch, pad_token_id=tokenizer.pad_token_id)
    losses = train(classifier, dataset, train_config, loss_fn=classification_loss, collate=collate)
    seconds = time.perf_counter() - start
    after = classifier_accuracy(classifier, tokenizer, heldout)
    return FinetuneResult(losses, before, after, None, None, seconds)


def transformers_classifier(num_labels: int = 2):
    """The tiny model with transformers' own head: ``LlamaForSequenceClassification``."""
    # The checkpoint holds a causal LM: from_pretrained keeps its body, drops lm_head and
    # initialises a new ``score`` head. Its load report warns that score is missing from the
    # checkpoint; that is the point here, so the warning is silenced.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            tiny_model_dir(), num_labels=num_labels, use_safetensors=True, dtype=torch.float32
        )
    finally:
        transformers.logging.set_verbosity(verbosity)


@functools.cache
def run_trainer(config: ClassifierConfig = ClassifierConfig()) -> FinetuneResult:
    """The same fine-tune with transformers' ``Trainer`` on ``AutoModelForSequenceClassification``."""
    _, tokenizer = load_model("tiny")  # also builds the tiny model on first use
    torch.manual_seed(config.seed)
    model = transformers_classifier()
    heldout = sentiment_task().heldout
    before = classifier_accuracy(model, tokenizer, heldout)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=config.max_steps,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            lr_scheduler_type="cosine",
            seed=config.seed,
            logging_steps=1,  # log every step's loss, for the comparison with our loop
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=classification_examples(tokenizer, sentiment_task().train),
            data_collator=DataCollatorWithPadding(tokenizer),
        )
        trainer.remove_callback(PrinterCallback)  # it prints every logged loss to stdout
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return FinetuneResult(losses, before, classifier_accuracy(model, tokenizer, heldout), None, None, seconds)


# -- Command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Fully fine-tune a causal LM to write the sentiment label after a review.")
    defaults = FullFinetuneConfig()
    add_training_arguments(parser, defaults)
    parser.add_argument(
        "--replay", type=non_negative_float, default=0.0, help="share of pretraining text, in [0, 1)"
    )
    args, model, tokenizer = parse_and_load(parser, argv)
    config = FullFinetuneConfig(args.steps, args.batch_size, args.learning_rate, args.replay, seed=args.seed)
    result = finetune_causal_lm(model, tokenizer, config)
    print(f"trainable parameters  {sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    print(f"sentiment accuracy    {result.accuracy_before:.3f} -> {result.accuracy_after:.3f}")
    print(f"heldout perplexity    {result.perplexity_before:.3f} -> {result.perplexity_after:.3f}")
    print(f"training time         {result.seconds:.1f} s")


if __name__ == "__main__":
    main_guard(main)
