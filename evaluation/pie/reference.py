"""The published PIE-Bench numbers our report prints beside its own.

Table 1 of Ju et al., "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of Code"
(arXiv 2310.01506), as shipped in cure-lab/PnPInversion
(scripts/compare_direct_inversion_with_other_inversion_techniques.png): means over the 700 photos
at the paper's scales, in metrics.TABLE1's order. Rows are keyed by the names the reference gives
its output folders (run_editing_*.py), which are also our method names. Stable Diffusion 1.4,
except the PnP rows (1.5); the null-text row is the mean of runs on an A800 and an RTX 3090.
"DirectInversion" is the paper's own method ("Ours" in the table).
"""

from __future__ import annotations

from dataclasses import dataclass

CITATION = "PnP Inversion (Ju et al., arXiv 2310.01506), Table 1"


@dataclass(frozen=True)
class ReferenceRow:
    method: str  # the reference's output folder name = our method name
    inversion: str
    editing: str
    values: tuple[float, ...]  # structure x10^3, PSNR, LPIPS x10^3, MSE x10^4, SSIM x10^2, CLIP whole, CLIP edited
    note: str = ""


TABLE1_ROWS = (
    ReferenceRow("ddim+p2p", "DDIM", "P2P", (69.43, 17.87, 208.80, 219.88, 71.14, 25.01, 22.44)),
    ReferenceRow("null-text-inversion+p2p", "Null-text", "P2P", (13.44, 27.03, 60.67, 35.86, 84.11, 24.75, 21.86),
                 "mean of an A800 and an RTX 3090 run"),
    ReferenceRow("negative-prompt-inversion+p2p", "Negative-prompt", "P2P", (16.17, 26.21, 69.01, 39.73, 83.40, 24.61, 21.87)),
    ReferenceRow("stylediffusion+p2p", "StyleDiffusion", "P2P", (11.65, 26.05, 66.10, 38.63, 83.42, 24.78, 21.72)),
    ReferenceRow("directinversion+p2p", "DirectInversion", "P2P", (11.65, 27.22, 54.55, 32.86, 84.76, 25.02, 22.10)),
    ReferenceRow("ddim+masactrl", "DDIM", "MasaCtrl", (28.38, 22.17, 106.62, 86.97, 79.67, 23.96, 21.16)),
    ReferenceRow("directinversion+masactrl", "DirectInversion", "MasaCtrl", (24.70, 22.64, 87.94, 81.09, 81.33, 24.38, 21.35)),
    ReferenceRow("ddim+pix2pix-zero", "DDIM", "Pix2Pix-Zero", (61.68, 20.44, 172.22, 144.12, 74.67, 22.80, 20.54)),
    ReferenceRow("directinversion+pix2pix-zero", "DirectInversion", "Pix2Pix-Zero", (49.22, 21.53, 138.98, 127.32, 77.05, 23.31, 21.05)),
    ReferenceRow("ddim+pnp", "DDIM", "PnP", (28.22, 22.28, 113.46, 83.64, 79.05, 25.41, 22.55), "Stable Diffusion 1.5"),
    ReferenceRow("directinversion+pnp", "DirectInversion", "PnP", (24.29, 22.46, 106.06, 80.45, 79.68, 25.41, 22.62),
                 "Stable Diffusion 1.5"),
)
TABLE1 = {row.method: row for row in TABLE1_ROWS}
