"""nanodalle: DALL-E 1 and DALL-E 2 (unCLIP) from scratch, in one small PyTorch codebase."""


class UserError(Exception):
    """An error the user can fix (bad path, empty data, unknown preset, wrong checkpoint...).

    Scripts catch it at the top level and print its message as one line, exit status 2, no traceback.
    The message says what is wrong and what to do.
    """
