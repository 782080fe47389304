//! A shell command line as an agent's Bash tool sends it, cut into the
//! simple commands it would run, for the pre-tool hook's early decision.
//!
//! This is a best-effort reading, not a shell: it honours quotes and
//! escapes, splits at `;`, `&`, `|`, `&&`, `||`, newlines and parentheses,
//! reads `$( … )` and backticks as commands of their own, skips
//! redirections and leading `NAME=value` words, and looks inside
//! `sh -c '…'` and the usual command wrappers (`env`, `nohup`, `xargs`, …).
//! What it cannot see (variables, `eval`, functions) the exec gate still
//! decides when the program actually runs.

/// Wrappers whose first non-option word is the command they run.
const WRAPPERS: &[&str] = &[
    "env", "nohup", "nice", "time", "timeout", "exec", "xargs", "stdbuf", "setsid", "command",
    "builtin", "sudo", "doas", "chroot", "unbuffer", "ionice", "taskset", "strace", "watch",
];

/// The simple commands of `line` (each as argv), including those nested in
/// substitutions, `sh -c` strings and wrappers.
pub fn split_commands(line: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    collect(line, &mut out, 0);
    out
}

fn collect(line: &str, out: &mut Vec<Vec<String>>, depth: usize) {
    if depth > 8 {
        return;
    }
    let (words, nested) = lex(line);
    for n in nested {
        collect(&n, out, depth + 1);
    }
    let mut current: Vec<String> = Vec::new();
    let flush = |cmd: &mut Vec<String>, out: &mut Vec<Vec<String>>| {
        let argv = strip_prefix_words(std::mem::take(cmd));
        if argv.is_empty() {
            return;
        }
        // `sh -c 'STRING'`: the string is a command line of its own.
        let base = argv[0].rsplit('/').next().unwrap_or(&argv[0]);
        if matches!(base, "sh" | "bash" | "dash" | "zsh" | "ksh")
            && let Some(i) = argv.iter().position(|a| {
                a == "-c" || a.ends_with('c') && a.starts_with('-') && !a.starts_with("--")
            })
            && let Some(s) = argv.get(i + 1)
        {
            collect(s, out, depth + 1);
        }
        // A wrapper runs the command after its options (and, for env,
        // after NAME=value words).
        if WRAPPERS.contains(&base) {
            let rest: Vec<String> = argv
                .iter()
                .skip(1)
                .skip_while(|a| {
                    a.starts_with('-')
                        || (base == "env" && a.contains('='))
                        || (base == "timeout"
                            && a.chars().next().is_some_and(|c| c.is_ascii_digit()))
                })
                .cloned()
                .collect();
            if !rest.is_empty() {
                let mut inner = Vec::new();
                collect_argv(rest, &mut inner, depth + 1);
                out.extend(inner);
            }
        }
        out.push(argv);
    };
    for w in words {
        match w {
            Word::Op => flush(&mut current, out),
            Word::Text(t) => current.push(t),
        }
    }
    flush(&mut current, out);
}

fn collect_argv(argv: Vec<String>, out: &mut Vec<Vec<String>>, depth: usize) {
    let line = argv
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ");
    collect(&line, out, depth);
}

/// Drops leading `NAME=value` words and redirections.
fn strip_prefix_words(words: Vec<String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip_next = false;
    for w in words {
        if skip_next {
            skip_next = false;
            continue;
        }
        if is_redirection(&w) {
            // `> file` takes the next word; `>file` and `2>&1` do not.
            skip_next = w.trim_start_matches(|c: char| c.is_ascii_digit()).len() <= 2
                && !w.contains('&')
                && w.ends_with(['<', '>']);
            continue;
        }
        if out.is_empty() && is_assignment(&w) {
            continue;
        }
        out.push(w);
    }
    out
}

fn is_assignment(w: &str) -> bool {
    match w.split_once('=') {
        Some((name, _)) => {
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit())
        }
        None => false,
    }
}

fn is_redirection(w: &str) -> bool {
    let t = w.trim_start_matches(|c: char| c.is_ascii_digit());
    t.starts_with('>') || t.starts_with('<') || t.starts_with("&>")
}

enum Word {
    Text(String),
    Op,
}

/// Words and operators of `line`, and the bodies of its command
/// substitutions.
fn lex(line: &str) -> (Vec<Word>, Vec<String>) {
    let chars: Vec<char> = line.chars().collect();
    let mut words = Vec::new();
    let mut nested = Vec::new();
    let mut cur = String::new();
    let mut has = false;
    let mut i = 0;
    let push = |cur: &mut String, has: &mut bool, words: &mut Vec<Word>| {
        if *has {
            words.push(Word::Text(std::mem::take(cur)));
            *has = false;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' => {
                if let Some(n) = chars.get(i + 1) {
                    if *n != '\n' {
                        cur.push(*n);
                        has = true;
                    }
                    i += 2;
                } else {
                    i += 1;
                }
            }
            '\'' => {
                has = true;
                i += 1;
                while i < chars.len() && chars[i] != '\'' {
                    cur.push(chars[i]);
                    i += 1;
                }
                i += 1;
            }
            '"' => {
                has = true;
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' && i + 1 < chars.len() {
                        cur.push(chars[i + 1]);
                        i += 2;
                        continue;
                    }
                    if chars[i] == '$' && chars.get(i + 1) == Some(&'(') {
                        let (body, end) = balanced(&chars, i + 2);
                        nested.push(body);
                        i = end;
                        continue;
                    }
                    if chars[i] == '`' {
                        let end = (i + 1..chars.len())
                            .find(|&j| chars[j] == '`')
                            .unwrap_or(chars.len());
                        nested.push(chars[i + 1..end].iter().collect());
                        i = end + 1;
                        continue;
                    }
                    cur.push(chars[i]);
                    i += 1;
                }
                i += 1;
            }
            '$' if chars.get(i + 1) == Some(&'(') => {
                let (body, end) = balanced(&chars, i + 2);
                nested.push(body);
                has = true;
                i = end;
            }
            '`' => {
                let end = (i + 1..chars.len())
                    .find(|&j| chars[j] == '`')
                    .unwrap_or(chars.len());
                nested.push(chars[i + 1..end].iter().collect());
                has = true;
                i = end + 1;
            }
            ';' | '&' | '|' | '\n' | '(' | ')' | '{' | '}' => {
                // `>&`, `2>&1`, `&>`: part of a redirection, not an operator.
                if c == '&'
                    && (cur.ends_with('>') || cur.ends_with('<') || chars.get(i + 1) == Some(&'>'))
                {
                    cur.push(c);
                    has = true;
                    i += 1;
                    continue;
                }
                // Braces only group at the start of a word.
                if (c == '{' || c == '}') && has {
                    cur.push(c);
                    i += 1;
                    continue;
                }
                push(&mut cur, &mut has, &mut words);
                words.push(Word::Op);
                i += 1;
            }
            '#' if !has => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            c if c.is_whitespace() => {
                push(&mut cur, &mut has, &mut words);
                i += 1;
            }
            _ => {
                cur.push(c);
                has = true;
                i += 1;
            }
        }
    }
    push(&mut cur, &mut has, &mut words);
    (words, nested)
}

/// The text up to the `)` matching an opening one just before `start`,
/// and the index after it.
fn balanced(chars: &[char], start: usize) -> (String, usize) {
    let mut depth = 1;
    let mut i = start;
    let mut quote: Option<char> = None;
    while i < chars.len() {
        let c = chars[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '\'' | '"' => quote = Some(c),
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        return (chars[start..i].iter().collect(), i + 1);
                    }
                }
                _ => {}
            },
        }
        i += 1;
    }
    (chars[start..].iter().collect(), chars.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progs(line: &str) -> Vec<String> {
        split_commands(line)
            .into_iter()
            .map(|a| a[0].clone())
            .collect()
    }

    #[test]
    fn operators_split_commands() {
        assert_eq!(
            progs("cd x && make -j4 || echo 'a; b' | tee log; ls"),
            ["cd", "make", "echo", "tee", "ls"]
        );
        assert_eq!(progs("(cd a; curl x) & wait"), ["cd", "curl", "wait"]);
    }

    #[test]
    fn quotes_escapes_assignments_and_redirections() {
        assert_eq!(
            split_commands("FOO=1 BAR='x y' curl -o out.txt \"http://a b\" 2>&1 >log"),
            vec![vec!["curl", "-o", "out.txt", "http://a b"]]
        );
        assert_eq!(
            split_commands("cat < in > out"),
            vec![vec!["cat".to_string()]]
        );
        assert_eq!(progs("c\\url x"), ["curl"]);
    }

    #[test]
    fn nested_commands_are_found() {
        assert_eq!(progs("echo $(curl -s x)"), ["curl", "echo"]);
        assert_eq!(progs("echo \"`wget y`\""), ["wget", "echo"]);
        assert_eq!(progs("bash -c 'x; curl z'"), ["x", "curl", "bash"]);
        assert_eq!(progs("env A=1 nohup curl q"), ["curl", "nohup", "env"]);
        assert_eq!(progs("timeout 5 curl q"), ["curl", "timeout"]);
        assert_eq!(progs("find . | xargs -0 rm -f"), ["find", "rm", "xargs"]);
    }

    #[test]
    fn comments_and_empty_input() {
        assert!(split_commands("").is_empty());
        assert!(split_commands("# just a comment").is_empty());
        assert_eq!(progs("ls # curl"), ["ls"]);
    }
}
