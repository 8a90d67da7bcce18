"""``kmeminspect completion bash|zsh|fish``: click's own completion scripts, with a working fish script."""

from __future__ import annotations

import click
from click import shell_completion

from ..errors import UsageError
from .group import main, run

COMPLETION_SHELLS = ("bash", "zsh", "fish")
COMPLETE_VAR = "_KMEMINSPECT_COMPLETE"  # what click derives from the program name "kmeminspect"

_FISH_SOURCE = """\
function %(complete_func)s;
    set -l response (env %(complete_var)s=fish_complete COMP_WORDS=(commandline -cp) \\
COMP_CWORD=(commandline -t) %(prog_name)s);

    for completion in $response;
        set -l metadata (string split -m 1 "," $completion);

        if test $metadata[1] = "dir";
            __fish_complete_directories $metadata[2];
        else if test $metadata[1] = "file";
            __fish_complete_path $metadata[2];
        else if test $metadata[1] = "plain";
            echo $metadata[2];
        end;
    end;
end;

complete --no-files --command %(prog_name)s --arguments "(%(complete_func)s)";
"""


class _FishComplete(shell_completion.FishComplete):
    """click's fish completion with a script that works: click 8.4.0 and 8.4.1 print a fish script that
    splits its own command over two lines (pallets/click#3502). One ``type,value<TAB>help`` line per
    completion, as fish's ``complete --arguments`` expects, like click 8.4.2."""

    source_template = _FISH_SOURCE

    def format_completion(self, item: shell_completion.CompletionItem) -> str:
        if item.help:
            return f"{item.type},{item.value}\t{' '.join(item.help.split())}"
        return f"{item.type},{item.value}"


shell_completion.add_completion_class(_FishComplete, "fish")


def _complete_shells(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return [shell for shell in COMPLETION_SHELLS if shell.startswith(incomplete)]


@main.command()
@click.argument("shell", required=False, metavar="bash|zsh|fish", shell_complete=_complete_shells)
def completion(shell: str | None) -> None:
    """Print the shell completion script for bash, zsh or fish.

    \b
        kmeminspect completion bash > /etc/bash_completion.d/kmeminspect
        kmeminspect completion zsh > ~/.kmeminspect.zsh   # and in ~/.zshrc, after compinit: . ~/.kmeminspect.zsh
        kmeminspect completion fish > ~/.config/fish/completions/kmeminspect.fish
    """

    def body() -> None:
        if shell is None:
            raise UsageError("completion needs a shell: bash, zsh or fish")
        complete = shell_completion.get_completion_class(shell) if shell in COMPLETION_SHELLS else None
        if complete is None:
            raise UsageError(f"completion {shell}: not a shell kmeminspect completes; choose bash, zsh or fish")
        click.echo(complete(main, {}, "kmeminspect", COMPLETE_VAR).source(), nl=False)

    run(body)
