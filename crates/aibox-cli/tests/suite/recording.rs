//! Session recording end to end: a real `aibox shell` on a terminal is
//! recorded encrypted; the export plays in the distribution's asciinema
//! (`asciinema cat` prints what the terminal showed); a wrong key and a
//! flipped byte are refused; required recording cannot be skipped.

use super::common::*;
use std::io::Write;

fn recordings(c: &Ctx) -> Vec<serde_json::Value> {
    let out = ok(&c.out(&["recording", "list", "--format", "json"]));
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

both_modes!(
    shell_sessions_are_recorded_encrypted_and_play_in_asciinema,
    |c: Ctx| {
        c.add_config("audit:\n  recording: required\n  recording_input: true\n");
        let ws = c.ws.display().to_string();
        ok(&c.out(&["start", "-w", &ws, "--name", "rec"]));
        let mut p = Pty::spawn(c.aibox(&["shell", "--name", "rec"]), 24, 80);
        let notice = p.read_until("recording this session as");
        assert!(
            notice.contains("This session is being recorded"),
            "{notice:?}"
        );
        p.master
            .write_all(b"echo rec-$((6*7)); printf 'caf\\303\\251\\n'\n")
            .unwrap();
        let mut shown = p.read_until("café");
        p.master.write_all(b"exit 3\n").unwrap();
        shown.push_str(&p.read_until("session recorded as"));
        assert_eq!(p.child.wait().unwrap().code(), Some(3));
        assert!(shown.contains("rec-42"), "{shown:?}");

        let list = recordings(&c);
        assert_eq!(list.len(), 1, "{list:?}");
        let id = list[0]["id"].as_str().unwrap().to_string();
        assert_eq!(list[0]["sandbox"], "rec");
        // The session's audit event names its recording.
        ok(&c.out(&["stop", "--name", "rec"]));
        assert!(audit_events(&c, "rec").iter().any(|e| {
            e["event_type"] == "session.start" && e["details"]["recording"] == id.as_str()
        }));
        // Encrypted at rest: nothing the session showed is in the file.
        let file = std::path::PathBuf::from(list[0]["path"].as_str().unwrap());
        let raw = std::fs::read(&file).unwrap();
        assert!(!String::from_utf8_lossy(&raw).contains("rec-42"));

        // Exported, it plays in asciinema: `asciinema cat` prints exactly
        // what the terminal showed during the session.
        let cast = c.dir.path().join("session.cast");
        ok(&c.out(&[
            "recording",
            "export",
            &id,
            "--decrypt",
            "-o",
            &cast.display().to_string(),
        ]));
        // (asciinema cat reads keys from /dev/tty: it runs on a terminal.)
        let mut cmd = std::process::Command::new("asciinema");
        cmd.arg("cat").arg(&cast).env("LANG", "C.UTF-8");
        let mut player = Pty::spawn(cmd, 24, 80);
        let played = player.read_until("\u{0}never");
        assert_eq!(player.child.wait().unwrap().code(), Some(0), "{played:?}");
        assert!(
            played.contains("rec-42") && played.contains("café"),
            "{played:?}"
        );
        // (The player's terminal may turn \n into \r\n; compare lines.)
        let norm = |s: &str| s.replace("\r\n", "\n").replace('\r', "");
        assert!(
            norm(&shown).contains(norm(&played).trim_end_matches('\n')),
            "asciinema shows {played:?}\nthe terminal showed {shown:?}"
        );
        // Keystrokes were asked for: they are there as input events.
        let text = std::fs::read_to_string(&cast).unwrap();
        assert!(
            text.lines()
                .any(|l| l.contains("\"i\"") && l.contains("exit")),
            "{text}"
        );
        let play = ok(&c.out(&["recording", "play", &id, "--speed", "50"]));
        assert!(play.contains("rec-42"), "{play:?}");

        // A wrong key, and one flipped byte, are refused.
        let key = c.dir.path().join("recording.key");
        let genuine = std::fs::read(&key).unwrap();
        std::fs::write(&key, "ab".repeat(32)).unwrap();
        let o = c.out(&["recording", "export", &id, "--decrypt"]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains("not this key"), "{}", stderr(&o));
        std::fs::write(&key, &genuine).unwrap();
        let mut flipped = raw.clone();
        let at = raw.len() - 20;
        flipped[at] ^= 0x01;
        std::fs::write(&file, &flipped).unwrap();
        let o = c.out(&["recording", "export", &id, "--decrypt"]);
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains("does not authenticate") && stderr(&o).contains("altered"),
            "{}",
            stderr(&o)
        );
        std::fs::write(&file, &raw).unwrap();
        ok(&c.out(&["recording", "export", &id, "--decrypt"]));

        // Required means required.
        ok(&c.out(&["start", "-w", &ws, "--name", "rec"]));
        let mut p = Pty::spawn(c.aibox(&["shell", "--name", "rec", "--no-record"]), 24, 80);
        let out = p.read_until("required");
        assert!(out.contains("recording is required"), "{out:?}");
        assert_ne!(p.child.wait().unwrap().code(), Some(0));
        // `exec -t` is a terminal session too: recorded.
        let mut p = Pty::spawn(
            c.aibox(&[
                "exec",
                "-t",
                "--name",
                "rec",
                "--",
                "sh",
                "-c",
                "echo via-exec",
            ]),
            24,
            80,
        );
        let out = p.read_until("session recorded as");
        assert!(out.contains("via-exec"), "{out:?}");
        assert_eq!(p.child.wait().unwrap().code(), Some(0));
        assert_eq!(recordings(&c).len(), 2);
        ok(&c.out(&["stop", "--name", "rec"]));
    }
);

both_modes!(
    recording_off_refuses_record_and_records_nothing,
    |c: Ctx| {
        let ws = c.ws.display().to_string();
        ok(&c.out(&["start", "-w", &ws, "--name", "norec"]));
        let mut p = Pty::spawn(c.aibox(&["shell", "--name", "norec", "--record"]), 24, 80);
        let out = p.read_until("recording is off");
        assert!(out.contains("audit.recording"), "{out:?}");
        assert_ne!(p.child.wait().unwrap().code(), Some(0));
        let mut p = Pty::spawn(c.aibox(&["shell", "--name", "norec"]), 24, 80);
        p.master.write_all(b"exit 0\n").unwrap();
        assert_eq!(p.child.wait().unwrap().code(), Some(0));
        assert!(recordings(&c).is_empty());
        ok(&c.out(&["stop", "--name", "norec"]));
    }
);

backend_test!(
    a_required_recording_that_fails_ends_the_session,
    Backend::Native,
    Mode::Root,
    |c: Ctx| {
        // The recordings live on a tiny filesystem that fills up during
        // the session: the recording can no longer be written, so the
        // session is ended then, not only reported at its end.
        c.add_config("audit:\n  recording: required\n");
        let _disk = Tmpfs::mount(&c.data.join("recordings"), "size=256k,mode=0700");
        let ws = c.ws.display().to_string();
        ok(&c.out(&["start", "-w", &ws, "--name", "full"]));
        let mut p = Pty::spawn(c.aibox(&["shell", "--name", "full"]), 24, 80);
        p.read_until("recording this session as");
        p.master
            .write_all(b"head -c 3000000 /dev/zero | base64; sleep 30; echo still-$((6*7))\n")
            .unwrap();
        let out = p.read_until("the session is ended");
        assert!(out.contains("can no longer be written"), "{out:?}");
        assert_ne!(p.child.wait().unwrap().code(), Some(0));
        assert!(!out.contains("still-42"), "{out:?}");
        // The sandbox outlives the session; the shell does not.
        ok(&c.out(&["stop", "--name", "full"]));
        let ends = audit_events(&c, "full")
            .into_iter()
            .filter(|e| e["event_type"] == "session.end")
            .count();
        assert_eq!(ends, 1);
    }
);
