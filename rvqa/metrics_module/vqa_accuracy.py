"""VQA accuracy (the official VQA evaluation) as a Hugging Face ``evaluate`` metric.

Load it by path, offline::

    import evaluate
    from rvqa.metrics import evaluate_module_path

    vqa = evaluate.load(evaluate_module_path())  # or the folder rvqa/metrics_module
    vqa.compute(
        predictions=["2", "yes"],
        references=[["two"] * 10, ["yes"] * 9 + ["no"]],
        question_types=["how many", "is the"],  # optional
        answer_types=["number", "yes/no"],  # optional
    )
    # {"accuracy": 100.0, "per_question_type": {...}, "per_answer_type": {...},
    #  "scores": [100.0, 100.0]}

All numbers come from :func:`rvqa.metrics.evaluate_vqa` (one implementation).
"""

import datasets
import evaluate

from rvqa.metrics import evaluate_vqa

_CITATION = """\
@inproceedings{goyal2017making,
  title={Making the V in VQA Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={CVPR},
  year={2017}
}
"""

_DESCRIPTION = """\
Official VQA accuracy (VQA v2 / OK-VQA): answers are normalised as the official
evaluation script does (whitespace, the all-answers-identical rule, punctuation,
periods, number words, articles, contractions); a prediction scores
min(1, matches / 3) against each leave-one-out subset of the human answers,
averaged over the subsets. Aggregates are x100 and rounded to two decimals.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): One predicted answer per question.
    references (list of list of str): The human answers of each question
        (10 in VQA v2 / OK-VQA).
    question_types (list of str, optional): Question type of each question,
        for the per-question-type table. Passed to ``compute`` (not ``add_batch``),
        aligned with all examples added so far.
    answer_types (list of str, optional): Answer type of each question
        ("yes/no", "number", "other"), for the per-answer-type table.
Returns:
    accuracy (float): Overall accuracy x100, two decimals.
    per_question_type (dict): Question type -> accuracy x100 (empty if not given).
    per_answer_type (dict): Answer type -> accuracy x100 (empty if not given).
    scores (list of float): Per-question accuracy x100, two decimals, in input order.
Examples:
    >>> vqa = evaluate.load("rvqa/metrics_module/vqa_accuracy.py")
    >>> vqa.compute(predictions=["yes"], references=[["yes"] * 9 + ["no"]])["accuracy"]
    100.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VQAAccuracy(evaluate.Metric):
    """The official VQA accuracy, delegating to :func:`rvqa.metrics.evaluate_vqa`."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://github.com/GT-Vision-Lab/VQA"],
        )

    def _compute(self, predictions, references, question_types=None, answer_types=None):
        n = len(predictions)
        for name, values in (("question_types", question_types), ("answer_types", answer_types)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} predictions")
        annotations = [
            {
                "question_id": i,
                "question_type": None if question_types is None else question_types[i],
                "answer_type": None if answer_types is None else answer_types[i],
                "answers": list(references[i]),
            }
            for i in range(n)
        ]
        result = evaluate_vqa(dict(enumerate(predictions)), annotations)
        return {
            "accuracy": result.overall,
            "per_question_type": result.per_question_type,
            "per_answer_type": result.per_answer_type,
            "scores": [result.per_question[i] for i in range(n)],
        }
