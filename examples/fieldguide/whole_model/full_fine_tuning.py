"""Full fine-tuning: train every weight of the base model on the task.

Two ways to fine-tune the lab's base model for sentiment, both updating all of its weights:

* **as a language model**: train it to write the label word after the review, with the very
  prompt and label words the zero-shot metric reads (``tasks.sentiment_prompt``), so the
  lab's ``sentiment_accuracy`` measures the result unchanged;
* **as a classifier**: put a linear head on the hidden state of the last real token, as BERT
  and transformers' ``LlamaForSequenceClassification`` do, and train it with a class loss.

Run it on any causal LM::

    python -m fieldguide.whole_model.full_fine_tuning --model tiny
"""

import tempfile
import time
from dataclasses import replace

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

from fieldguide.lab.cache import cached
from fieldguide.lab.cli import (
    add_output_argument,
    add_replay_argument,
    add_training_arguments,
    example_parser,
    main_guard,
    training_config,
)
from fieldguide.lab.data import pad_batch, pretraining_blocks, with_replay
from fieldguide.lab.experiment import (
    Presets,
    Technique,
    make_run,
    plot_losses,
    real_model_training,
    run_technique,
)
from fieldguide.lab.loading import load_model, parse_and_load, save_if_asked
from fieldguide.lab.metrics import heldout_perplexity, sentiment_outcomes
from fieldguide.lab.pretrain import PretrainConfig
from fieldguide.lab.tasks import ClassificationExample, sentiment_task, verbalized_example
from fieldguide.lab.training import TrainConfig, seed_everything

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

PRESETS = Presets(
    # 600 steps of 16 reviews; a learning rate a third of the one the model was pretrained at.
    tiny=TrainConfig(max_steps=600, batch_size=16, learning_rate=1e-3),
    real=real_model_training(max_steps=300),  # see fieldguide.lab.experiment
)


def causal_lm_training_set(tokenizer, replay_fraction: float = 0.0, block_size: int = 16) -> list[dict]:
    """The task's training split, plus pretraining blocks making up ``replay_fraction`` of it."""
    task = [verbalized_example(tokenizer, example) for example in sentiment_task().train]
    seed = PretrainConfig().train.seed  # the base model's own pretraining stories
    return with_replay(task, lambda n: pretraining_blocks(tokenizer, n, block_size, seed), replay_fraction)


def label_word_fine_tuning(replay_fraction: float = 0.0) -> Technique:
    """Full fine-tuning to write the label word; held-out perplexity measured before and after."""
    heldout = sentiment_task().heldout
    return Technique(
        data=lambda tokenizer: causal_lm_training_set(tokenizer, replay_fraction),
        score=lambda model, tokenizer: sentiment_outcomes(model, tokenizer, heldout),
        measures={"perplexity": heldout_perplexity},
    )


@cached  # a doctest and the loss-curve figure share one run instead of training twice
def run_causal_lm(learning_rate: float = 1e-3, replay_fraction: float = 0.0):
    """Fine-tune a fresh copy of the tiny model at ``learning_rate``, with optional replay."""
    model, tokenizer = load_model("tiny")
    config = replace(PRESETS.tiny, learning_rate=learning_rate)
    return run_technique(label_word_fine_tuning(replay_fraction), model, tokenizer, config)


# The settings compared on the page: how fast to learn, and whether to rehearse old text.
FORGETTING_SETTINGS = {
    "lr 1e-3": {"learning_rate": 1e-3},
    "lr 3e-3": {"learning_rate": 3e-3},
    "lr 3e-3 + 50% replay": {"learning_rate": 3e-3, "replay_fraction": 0.5},
}


def loss_figure(ax) -> None:
    """The loss curve of the page's first run, at the preset's learning rate."""
    plot_losses(ax, {"lr 1e-3": run_causal_lm()}, "Full fine-tuning on sentiment, label words as targets")


def forgetting_loss_figure(ax) -> None:
    """The loss curves of the forgetting section's three settings, replay among them."""
    runs = {name: run_causal_lm(**setting) for name, setting in FORGETTING_SETTINGS.items()}
    plot_losses(ax, runs, "Two learning rates, and replay")


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
    seed_everything(seed)
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
def classifier_outcomes(model: nn.Module, tokenizer, examples: list[ClassificationExample]) -> list[int]:
    """1 for each review whose highest-scoring class is the right one, else 0."""
    model.eval()
    batch = classification_batch(classification_examples(tokenizer, examples), tokenizer.pad_token_id)
    batch = {key: value.to(next(model.parameters()).device) for key, value in batch.items()}
    return (_class_logits(model, batch).argmax(dim=-1) == batch["labels"]).int().tolist()


CLASSIFIER_TRAINING = TrainConfig(max_steps=600, batch_size=16, learning_rate=1e-3)


def classification_head(heldout: list[ClassificationExample], pad_token_id: int) -> Technique:
    """A new head on the model's body, both trained with a class loss."""
    return Technique(
        prepare=lambda model, tokenizer: classifier_from_causal_lm(model, seed=CLASSIFIER_TRAINING.seed),
        data=lambda tokenizer: classification_examples(tokenizer, sentiment_task().train),
        loss=classification_loss,
        collate=lambda examples: classification_batch(examples, pad_token_id),
        score=lambda model, tokenizer: classifier_outcomes(model, tokenizer, heldout),
    )


@cached
def run_classifier():
    """Train our classifier, body and head, on the tiny model with the lab's loop."""
    model, tokenizer = load_model("tiny")
    technique = classification_head(sentiment_task().heldout, tokenizer.pad_token_id)
    return run_technique(technique, model, tokenizer, CLASSIFIER_TRAINING)


def transformers_classifier(num_labels: int = 2):
    """The tiny model with transformers' own head: ``LlamaForSequenceClassification``."""
    # The checkpoint holds a causal LM: from_pretrained keeps its body, drops lm_head and
    # initialises a new ``score`` head. Its load report warns that score is missing from the
    # checkpoint; that is the point here, so the warning is silenced.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, _ = load_model("tiny", auto_class=AutoModelForSequenceClassification, num_labels=num_labels)
        return model
    finally:
        transformers.logging.set_verbosity(verbosity)


@cached
def run_trainer():
    """The same fine-tune with transformers' ``Trainer`` on ``AutoModelForSequenceClassification``."""
    config = CLASSIFIER_TRAINING
    _, tokenizer = load_model("tiny")
    seed_everything(config.seed)  # the new head's initial weights
    model = transformers_classifier()
    heldout = sentiment_task().heldout
    before = classifier_outcomes(model, tokenizer, heldout)
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
    tokens = trainer.state.num_input_tokens_seen
    return make_run(model, before, classifier_outcomes(model, tokenizer, heldout), losses, seconds, tokens)


# -- Command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Fully fine-tune a causal LM to write the sentiment label after a review.")
    add_training_arguments(parser, PRESETS)
    add_replay_argument(parser)
    add_output_argument(parser)
    args, model, tokenizer = parse_and_load(parser, argv)
    config = training_config(args, PRESETS)
    keep = args.output is not None
    run = run_technique(label_word_fine_tuning(args.replay), model, tokenizer, config, keep_model=keep)
    print(run.report("sentiment accuracy"))
    save_if_asked(args.output, run.model, tokenizer)


if __name__ == "__main__":
    main_guard(main)
