//! The LDIF reader on arbitrary text: it never panics, and whatever it
//! accepts survives a write and a second read unchanged (the LDIF file
//! backend rewrites the file it read, so a record that changed on the way
//! would be silently edited).
#![no_main]

use gmsa_reconciler::ldif;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(records) = ldif::parse(text) else {
        return;
    };
    let written = ldif::write(&records);
    match ldif::parse(&written) {
        Ok(again) => assert_eq!(
            again, records,
            "records changed on a write and read:\n{written}"
        ),
        Err(err) => panic!("the writer's output does not read back: {err}\n{written}"),
    }
    // Written once more, the text is the same: the writer has one form.
    assert_eq!(ldif::write(&records), written);
});
