"""Model tools: the demo teacher (:mod:`~rlkd.models.teacher`: a GGUF converted once into an HF folder) and
students that share the teacher's tokenizer (:mod:`~rlkd.models.student`: kept layers or a fresh smaller config)."""

from rlkd.models.errors import ModelToolError
from rlkd.models.student import (
    CPU_ATTENTION_HEAD_DIMS,
    STUDENT_MARKER,
    load_student_config,
    make_student_from_config,
    make_student_from_layers,
    parse_layers,
)
from rlkd.models.teacher import (
    CONVERT_MARKER,
    SMOLLM2_GGUF,
    SMOLLM2_NAME,
    convert_gguf,
    default_teacher_dir,
    ensure_converted,
    ensure_smollm2_teacher,
    find_smollm2_gguf,
    rlkd_home,
)

__all__ = [
    "CONVERT_MARKER", "CPU_ATTENTION_HEAD_DIMS", "SMOLLM2_GGUF", "SMOLLM2_NAME", "STUDENT_MARKER", "ModelToolError",
    "convert_gguf", "default_teacher_dir", "ensure_converted", "ensure_smollm2_teacher", "find_smollm2_gguf",
    "load_student_config", "make_student_from_config", "make_student_from_layers", "parse_layers", "rlkd_home",
]
