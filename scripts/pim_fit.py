"""The derived PIM latency model against the reference simulator's per-device fits.

    python scripts/pim_fit.py

The reference simulator (LLMServingSim 2.0) times PIM decode attention per request and channel as
``(slope * g * L + intercept * q) / split`` with a slope and intercept fitted per device for
Llama-3.1-8B (REFERENCE.md §1.11): four devices, four fits. jaxsim derives both coefficients from
the device's INI (``jaxsim/pim.py``: three global constants, fitted jointly on the four devices).
This prints the constants, each device's derived coefficients against the reference's fits, and
the leave-one-device-out error (the model fitted on the three other devices), plus what the
errors mean for a placement's time at a short and a long context.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The reference's fits (slope ns per context token, intercept ns), REFERENCE.md §1.11: data, kept
# out of the package (jaxsim derives its coefficients from the INI).
REFERENCE_FITS = {
    "DDR4_8GB_3200_pim": (333.2538, 30675.2739),
    "LPDDR4X_2GB_4266_pim": (432.4458, 33918.1734),
    "LPDDR5_2GB_6400_pim": (282.4338, 15996.7018),
    "HBM2_1GB_2000_pim": (242.0548, 14513.5015),
}
CONTEXTS = (128, 2048)  # placement times are compared at these context lengths


def table(pim_dir=ROOT / "profiles" / "pim") -> dict:
    """``{"constants": (C_CLOCK, C_STREAM, C_WRITE), "rows": {device: {...}}}``: per device its
    reference fit, the derived coefficients (the package's constants), their errors, the
    leave-one-out errors, and the error of a placement's time at each of ``CONTEXTS``."""
    from jaxsim import pim

    devices = {n: pim.load_device(n, pim_dir) for n in REFERENCE_FITS}
    constants, fit_err = pim.fit_constants(devices, REFERENCE_FITS)
    loo = pim.leave_one_out(devices, REFERENCE_FITS)
    rows = {}
    for n, (s_ref, i_ref) in REFERENCE_FITS.items():
        s, i = pim.derived_coefficients(devices[n])
        rows[n] = dict(reference=(s_ref, i_ref), derived=(s, i), error=(s / s_ref - 1, i / i_ref - 1),
                       fit_error=fit_err[n], loo=loo[n],
                       time_error={L: (s * L + i) / (s_ref * L + i_ref) - 1 for L in CONTEXTS})
    return dict(constants=constants, rows=rows)


def main() -> int:
    from jaxsim import pim

    t = table()
    c = t["constants"]
    print(f"fitted constants: C_CLOCK {c[0]:.3f}, C_STREAM {c[1]:.4f}, C_WRITE {c[2]:.1f} "
          f"(package: {pim.C_CLOCK}, {pim.C_STREAM}, {pim.C_WRITE})")
    print("slope = C_CLOCK * tCK + C_STREAM * 4096 B / (channel_bw * banks);  intercept = C_WRITE * CWL * tCK\n")
    head = ("device", "slope ref", "derived", "err", "LOO err", "intercept ref", "derived", "err", "LOO err",
            *[f"t({L}) err" for L in CONTEXTS])
    lines = []
    for n, r in t["rows"].items():
        lines.append((n, f"{r['reference'][0]:.2f}", f"{r['derived'][0]:.2f}", f"{r['error'][0]:+.1%}",
                      f"{r['loo'][0]:+.1%}", f"{r['reference'][1]:.0f}", f"{r['derived'][1]:.0f}",
                      f"{r['error'][1]:+.1%}", f"{r['loo'][1]:+.1%}",
                      *[f"{r['time_error'][L]:+.1%}" for L in CONTEXTS]))
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    for cells in (head, *lines):
        print("  ".join(x.ljust(w) if k == 0 else x.rjust(w) for k, (x, w) in enumerate(zip(cells, widths))))
    print("\nerr: derived / reference - 1 (the four devices fit together); LOO err: the model fitted on the three "
          "other devices; t(L) err: a placement's time slope * L + intercept at context L")
    return 0


if __name__ == "__main__":
    sys.exit(main())
