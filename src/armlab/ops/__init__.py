"""Operations: status, doctor, remote hosts."""
