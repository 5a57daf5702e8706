"""Build page.html: the page that `dvc plots show` and `dvc plots diff` fill (.dvc/config: plots.html_template),
with Vega, Vega-Lite and vega-embed inside it, so that its charts draw without the internet.

DVC's own page loads the three from a CDN, and offline each chart is blank space without a message. Why this way:
- The scripts are inlined, not put beside the page: DVC writes the page wherever `-o` says, and a page that needs
  no other file still draws when it is moved, mailed or opened from another folder.
- From the npm registry (the projects' own builds, 0.8 MB in all): no PyPI package the pipeline already installs
  ships them; altair loads them from a CDN as DVC does, and vl-convert-python (a 33 MB wheel) keeps them inside
  its binary.
- Vega 5, Vega-Lite 5 and vega-embed 6: DVC's templates are Vega-Lite 5 specs, and these are the last lines that
  ship browser builds (the next majors are ES modules only).

Run `python vendor/vega/build_page.py` (it needs npm) after changing a version below; commit page.html.
"""

import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGES = {  # npm package -> (version, its browser build in the tarball)
    "vega": ("5.33.1", "package/build/vega.min.js"),
    "vega-lite": ("5.23.0", "package/build/vega-lite.min.js"),
    "vega-embed": ("6.29.0", "package/build/vega-embed.min.js"),
}
PAGE = Path(__file__).with_name("page.html")

# DVC fills {plot_divs} (required) and {refresh_tag}; a template without {scripts} gets no CDN <script> tags.
HEAD = """<!DOCTYPE html>
<!-- Built by vendor/vega/build_page.py: do not edit by hand. {versions}, from the npm registry, under this
licence:

{license}-->
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
"""
# As DVC's own page, and images no wider than the window: a wide figure is shrunk, not cut off.
TAIL = """    <style>
        table {
            border-spacing: 15px;
        }
        img {
            max-width: calc(100vw - 60px);
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def script(source: str) -> str:
    # The map files are not shipped; without the comment no browser asks for them.
    lines = [line for line in source.splitlines() if not line.startswith("//# sourceMappingURL=")]
    code = "\n".join(lines)
    for placeholder in ("{plot_divs}", "{refresh_tag}", "{scripts}", "</script"):
        if placeholder in code:
            raise SystemExit(f"the build contains {placeholder!r}: DVC or the browser would cut it")
    return f"    <script>\n{code}\n    </script>\n"


def main() -> None:
    scripts, license_text = [], ""
    with tempfile.TemporaryDirectory() as tmp:
        for name, (version, member) in PACKAGES.items():
            out = subprocess.run(
                ["npm", "pack", "--silent", f"{name}@{version}"], cwd=tmp, check=True, capture_output=True, text=True
            )
            with tarfile.open(Path(tmp) / out.stdout.strip().splitlines()[-1]) as tar:
                scripts.append(script(tar.extractfile(member).read().decode()))
                if name == "vega-embed":  # the three share it; vega's tarball has no LICENSE file
                    license_text = tar.extractfile("package/LICENSE").read().decode()
    versions = ", ".join(f"{name} {version}" for name, (version, _) in PACKAGES.items())
    PAGE.write_text(HEAD.format(versions=versions, license=license_text) + "".join(scripts) + TAIL)
    print(f"wrote {PAGE} ({PAGE.stat().st_size:,} bytes): {versions}")


if __name__ == "__main__":
    main()
