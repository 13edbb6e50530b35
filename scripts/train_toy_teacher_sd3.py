"""Regenerate the toy-digits-sd3 teacher (options: --help; details: fewstep/models/toy_teacher_sd3.py)."""
import pathlib, sys; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702
from fewstep.models.toy_teacher_sd3 import main  # noqa: E402
raise SystemExit(main())
