"""``world``: the synthetic VQA world of ``glimpseprune make-world`` (and any split in our records format) through the
generic task path: ``DATA_DIR/records.jsonl`` (or the JSONL file itself) with images relative to it. The prompt is the
question as it is (what ``glimpseprune eval --split`` asks); exact match with the same normalisation; ``category`` is
the question family. ``limit`` takes the first records."""

from __future__ import annotations

from pathlib import Path

from ._base import Sample, Task


class WorldTask(Task):
    name = "world"
    metric = "exact_match"
    download = "Make it with `glimpseprune make-world --out DIR` (DIR/records.jsonl + DIR/images/)."

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        from ...data.records import read_records

        p = Path(data_dir).expanduser()
        path = p if p.is_file() else p / "records.jsonl"
        self.need_file(path, "records.jsonl")
        try:
            records = read_records(path, limit)
        except ValueError as err:
            raise self.format_error(path, str(err)) from err
        return self.finish(Sample(id=r.id, image_paths=[r.image_path(path.parent)], question=r.question, prompt="",
                                  answers=[r.answer], meta={"category": r.family}) for r in records)

    def prompt(self, sample: Sample) -> str:
        return sample.question


class WorldVideoTask(Task):
    """``world_video``: clips of the synthetic world (``glimpseprune make-world --video``): ``DATA_DIR/
    video_records.jsonl`` with frame files relative to it; the question as it is; exact match; ``category`` is the
    question family. The answer lives in one moment (frame pair) of the clip."""

    name = "world_video"
    metric = "exact_match"
    download = "Make it with `glimpseprune make-world --video --out DIR` (DIR/video_records.jsonl + DIR/videos/)."

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        from ...data.world_video import read_video_records

        p = Path(data_dir).expanduser()
        path = p if p.is_file() else p / "video_records.jsonl"
        self.need_file(path, "video_records.jsonl")
        try:
            records = read_video_records(path, limit)
        except ValueError as err:
            raise self.format_error(path, str(err)) from err
        return self.finish(Sample(id=r.id, image_paths=[], video=r.frame_paths(path.parent), question=r.question,
                                  prompt="", answers=[r.answer],
                                  meta={"category": r.family, "fps": r.fps, "moment": r.moment})
                           for r in records)

    def prompt(self, sample: Sample) -> str:
        return sample.question
