"""The base of every config model: unknown keys are errors, and nan / inf are never a setting."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        """nan and inf are never a setting (YAML reads `.nan` and `.inf` as floats)."""
        values = v if isinstance(v, tuple | list) else (v,)
        if any(isinstance(x, float) and not math.isfinite(x) for x in values):
            raise ValueError(f"must be a finite number, got {v}")
        return v
