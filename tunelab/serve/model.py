"""The model behind the server: a loaded `Predictor`, what the API says about it, and the batch call.

Texts become examples and predictions become records through the task's own functions, as in `tunelab
predict` (Task.text_examples, Task.records), so the server and the command line give the same answer.
"""

from dataclasses import dataclass
from pathlib import Path

from tunelab.data.examples import TextExample
from tunelab.predict import Predictor


def raw_examples(texts: list) -> list[TextExample]:
    """A request's texts (each a text or a (text, text_pair) pair) as raw inputs, numbered from 1."""
    return [TextExample(t, None, "<request>", i + 1) if isinstance(t, str) else
            TextExample(t[0], None, "<request>", i + 1, text_pair=t[1]) for i, t in enumerate(texts)]


@dataclass(frozen=True)
class Route:
    """What one forward pass serves: requests are batched together only when their routes are equal."""

    task: str | None  # the Predictor's task argument: None for a single-task folder
    adapter: str | None = None
    max_new_tokens: int | None = None  # generation only; None: the model's own bound


class ModelService:
    """Task names as the API shows them: a multi-task folder's own names, else one task named by its kind
    (e.g. "ner"), which requests may leave out."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.multitask = bool(predictor.tasks)
        names = list(predictor.tasks) if self.multitask else [predictor.meta["task"]]
        self.tasks = {n: predictor.tasks[n] if self.multitask else predictor.task for n in names}
        # Adapters switched per request (single-task adapter folders, `--adapter NAME=DIR`): their labels.
        self.adapters = {name: meta["labels"] for name, (meta, _) in predictor.adapters.items()}

    def route(self, task: str | None, adapter: str | None, max_new_tokens: int | None) -> Route:
        """Assumes names already checked against self.tasks / self.adapters."""
        return Route(task if self.multitask else None, adapter, max_new_tokens)

    def task_for(self, route: Route):
        """The task object the Predictor uses for this route."""
        return self.predictor.task_for(route.adapter, route.task)

    def describe(self) -> dict:
        meta = self.predictor.meta
        base = str(meta.get("base_model", ""))
        tasks = {name: task.describe() for name, task in self.tasks.items()}
        return {
            "model": self.predictor.dir.name,
            # a packaged name, or only the last part of a local path: the server's file system is not the API's
            "base_model": Path(base).name if base else None,
            "tune": meta.get("tune"),
            "multitask": self.multitask,
            "task_required": self.multitask,
            "tasks": tasks,
            "adapters": {name: {"labels": labels} for name, labels in self.adapters.items()},
            "quantized": self.predictor.quantized,  # None, or the int8 agreement check's figures per task
        }

    def run(self, route: Route, texts: list) -> list[dict]:
        """One forward pass over `texts`, each a text or a (text, text_pair) pair (called on the model thread
        only). Returns one record each."""
        task = self.task_for(route)
        examples, offsets = task.text_examples(raw_examples(texts))
        predictions = self.predictor.predict(examples, adapter=route.adapter, task=route.task,
                                             max_new_tokens=route.max_new_tokens)
        return list(task.records(task.labels, examples, predictions, offsets))
