"""An aiosmtpd handler for the e-mail tests: aiosmtpd's maildir handler behind a server that
refuses some recipients, as real mail servers do.

- gone@<any domain> is refused for good (550 5.1.1, no such mailbox), every time;
- later@<any domain> is refused for now (451 4.3.0) the first time that address is asked for,
  then taken;
- closing@<any domain> is refused for now the first time that address is asked for, then for
  good (a mailbox being closed);
- every other recipient is taken.

Each recipient asked for (RCPT TO) is appended, one per line, to the file <maildir>.rcpt beside
the maildir, so a test can count how often each was tried.

Run as: python -m aiosmtpd -n -l HOST:PORT -c smtp_refusing.RefusingMailbox MAILDIR
(with this directory on PYTHONPATH).
"""

from aiosmtpd.handlers import Mailbox


class RefusingMailbox(Mailbox):
    def __init__(self, mail_dir):
        super().__init__(mail_dir)
        self.asked = {}

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with open(str(self.mail_dir) + ".rcpt", "a", encoding="utf-8") as log:
            log.write(address + "\n")
        # Counted by the whole address: later@a and later@b are refused for now once each.
        self.asked[address.lower()] = self.asked.get(address.lower(), 0) + 1
        asked = self.asked[address.lower()]
        local = address.split("@", 1)[0].lower()
        if local == "gone":
            return "550 5.1.1 no such mailbox"
        if local in ("later", "closing") and asked == 1:
            return "451 4.3.0 try again later"
        if local == "closing":
            return "550 5.1.1 mailbox closed"
        envelope.rcpt_tos.append(address)
        return "250 OK"
