"""The one exception type the CLI turns into a one-line message and an exit code (no traceback)."""


class InstructError(Exception):
    """A user-facing failure. exit_code 2 = bad usage or input, 1 = failure while running."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class DataError(InstructError):
    """Invalid user data, reported as `path:line: field: problem` (or `path: row N: ...` where a source has
    rows, not lines: parquet, arrow, datasets)."""

    def __init__(self, path: str, line: int | str | None, field: str | None, problem: str):
        where = path if line is None else f"{path}:{line}" if isinstance(line, int) else f"{path}: {line}"
        msg = f"{where}: {field}: {problem}" if field else f"{where}: {problem}"
        super().__init__(msg, exit_code=2)
        self.path, self.line, self.field, self.problem = path, line, field, problem
