"""Move jobs as explicit phase machines: live moves (shared storage and shared-nothing)."""

from vmferry.migration.model import Job, JobState, MoveOptions, MoveRequest, Phase

__all__ = ["Job", "JobState", "MoveOptions", "MoveRequest", "Phase"]
