"""The rows of a `mirage-trl data ... --format dataset` folder as lmms-eval documents, graded by mirage-trl."""

from mirage_trl.grading import grade


def doc_to_visual(doc):
    return [image.convert("RGB") for image in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The user turn as written, an `<image>` marker where each image goes (the mirage model places them)."""
    return "".join("<image>" if p["type"] == "image" else p["text"] for p in doc["messages"][0]["content"])


def process_results(doc, results):
    return {"accuracy": float(grade(doc["benchmark"], results[0], doc).correct)}
