"""Quote providers: where DCAP quotes come from.

One narrow interface (`QuoteProvider`) with three implementations: the simulated platform
(`modelyo.tee.sim`), TDX through Linux configfs-tsm (`modelyo.tee.tdx`) and SGX under Gramine
(`modelyo.tee.sgx`).
"""

from modelyo.tee.provider import REPORT_DATA_SIZE, QuoteProvider, Tee, check_report_data

__all__ = ["REPORT_DATA_SIZE", "QuoteProvider", "Tee", "check_report_data"]
