//! IR text as lines of tokens, and a cursor that reads a line's tokens with errors that
//! say where and what was expected.

use std::str::FromStr;

use super::ParseError;

/// Characters that are tokens of their own.
const PUNCT: &str = "()[],=*@:";

/// Whether `c` can be part of a word (a name, a number or a keyword): anything but
/// whitespace, punctuation, comments (`;`), strings (`"`) and weight labels (`%`).
pub(crate) fn is_word_char(c: char) -> bool {
    !c.is_whitespace() && !PUNCT.contains(c) && !matches!(c, ';' | '"' | '%')
}

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Tok {
    /// A name, number or keyword: `layers.0.attn`, `1e-5`, `none`.
    Word(String),
    /// A quoted string, unescaped.
    Str(String),
    /// A weight label: `%w3` is `Ref("w3")`.
    Ref(String),
    Punct(char),
}

#[derive(Clone, Debug)]
pub(super) struct Token {
    pub tok: Tok,
    /// 1-based column (in characters).
    pub col: usize,
    /// Byte range in the line.
    pub start: usize,
    pub end: usize,
}

/// A place in the text: 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Pos {
    pub line: usize,
    pub col: usize,
}

/// A line with at least one token.
pub(super) struct Line<'a> {
    pub number: usize,
    pub text: &'a str,
    pub tokens: Vec<Token>,
}

/// The lines of `text` that hold tokens (blank and comment-only lines dropped).
pub(super) fn lex(text: &str) -> Result<Vec<Line<'_>>, ParseError> {
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let tokens = lex_line(line, i + 1)?;
        if !tokens.is_empty() {
            lines.push(Line {
                number: i + 1,
                text: line,
                tokens,
            });
        }
    }
    Ok(lines)
}

type Chars<'a> = std::iter::Peekable<std::str::CharIndices<'a>>;

fn lex_line(line: &str, number: usize) -> Result<Vec<Token>, ParseError> {
    let mut tokens = Vec::new();
    let mut chars = line.char_indices().peekable();
    let mut col = 0;
    while let Some((start, c)) = chars.next() {
        col += 1;
        let token_col = col;
        let tok = match c {
            ';' => break,
            c if c.is_whitespace() => continue,
            c if PUNCT.contains(c) => Tok::Punct(c),
            '"' => match string(&mut chars, &mut col) {
                Some(s) => Tok::Str(s),
                None => {
                    let pos = Pos {
                        line: number,
                        col: token_col,
                    };
                    return Err(ParseError::at(pos, "this string has no closing `\"`"));
                }
            },
            '%' => Tok::Ref(word(&mut chars, &mut col, String::new())),
            c => Tok::Word(word(&mut chars, &mut col, c.to_string())),
        };
        let end = chars.peek().map_or(line.len(), |(i, _)| *i);
        tokens.push(Token {
            tok,
            col: token_col,
            start,
            end,
        });
    }
    Ok(tokens)
}

/// The rest of a word that starts with `s`.
fn word(chars: &mut Chars, col: &mut usize, mut s: String) -> String {
    while let Some((_, c)) = chars.next_if(|(_, c)| is_word_char(*c)) {
        s.push(c);
        *col += 1;
    }
    s
}

/// The rest of a quoted string, unescaped; `None` when the line ends first.
fn string(chars: &mut Chars, col: &mut usize) -> Option<String> {
    let mut s = String::new();
    loop {
        let (_, c) = chars.next()?;
        *col += 1;
        match c {
            '"' => return Some(s),
            '\\' => {
                let (_, c) = chars.next()?;
                *col += 1;
                s.push(match c {
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    c => c,
                });
            }
            c => s.push(c),
        }
    }
}

/// Reads one line's tokens in order.
pub(super) struct Cursor<'l, 'a> {
    line: &'l Line<'a>,
    at: usize,
}

impl<'l, 'a> Cursor<'l, 'a> {
    pub fn new(line: &'l Line<'a>) -> Self {
        Cursor { line, at: 0 }
    }

    pub fn peek(&self) -> Option<&'l Tok> {
        self.line.tokens.get(self.at).map(|t| &t.tok)
    }

    /// The token after the next one.
    pub fn peek2(&self) -> Option<&'l Tok> {
        self.line.tokens.get(self.at + 1).map(|t| &t.tok)
    }

    pub fn at_end(&self) -> bool {
        self.at >= self.line.tokens.len()
    }

    /// Where the next token starts (the end of the line when there is none).
    pub fn here(&self) -> Pos {
        let col = match self.line.tokens.get(self.at) {
            Some(t) => t.col,
            None => self.line.text.trim_end().chars().count() + 1,
        };
        Pos {
            line: self.line.number,
            col,
        }
    }

    /// The next token as written, for messages.
    pub fn found(&self) -> String {
        match self.line.tokens.get(self.at) {
            Some(t) => format!("`{}`", &self.line.text[t.start..t.end]),
            None => "the end of the line".to_string(),
        }
    }

    /// `expected {what}, found {the next token}`, at the next token.
    pub fn expected(&self, what: &str) -> ParseError {
        ParseError::at(
            self.here(),
            format!("expected {what}, found {}", self.found()),
        )
    }

    pub fn eat_punct(&mut self, c: char) -> bool {
        let hit = self.peek() == Some(&Tok::Punct(c));
        if hit {
            self.at += 1;
        }
        hit
    }

    pub fn punct(&mut self, c: char) -> Result<(), ParseError> {
        if self.eat_punct(c) {
            Ok(())
        } else {
            Err(self.expected(&format!("`{c}`")))
        }
    }

    /// Skips the word `w` if it comes next.
    pub fn eat_word(&mut self, w: &str) -> bool {
        let hit = matches!(self.peek(), Some(Tok::Word(x)) if x == w);
        if hit {
            self.at += 1;
        }
        hit
    }

    pub fn keyword(&mut self, w: &str) -> Result<(), ParseError> {
        if self.eat_word(w) {
            Ok(())
        } else {
            Err(self.expected(&format!("`{w}`")))
        }
    }

    pub fn word(&mut self, what: &str) -> Result<(String, Pos), ParseError> {
        let pos = self.here();
        match self.peek() {
            Some(Tok::Word(w)) => {
                self.at += 1;
                Ok((w.clone(), pos))
            }
            _ => Err(self.expected(what)),
        }
    }

    /// A name: a word or a quoted string.
    pub fn name(&mut self, what: &str) -> Result<(String, Pos), ParseError> {
        let pos = self.here();
        match self.peek() {
            Some(Tok::Word(w) | Tok::Str(w)) => {
                self.at += 1;
                Ok((w.clone(), pos))
            }
            _ => Err(self.expected(what)),
        }
    }

    /// A word parsed as `T` (a number, a dtype, ...).
    pub fn parsed<T: FromStr>(&mut self, what: &str) -> Result<T, ParseError> {
        match self.peek() {
            Some(Tok::Word(w)) => match w.parse() {
                Ok(v) => {
                    self.at += 1;
                    Ok(v)
                }
                Err(_) => Err(self.expected(what)),
            },
            _ => Err(self.expected(what)),
        }
    }

    pub fn weight_ref(&mut self) -> Result<(String, Pos), ParseError> {
        let pos = self.here();
        match self.peek() {
            Some(Tok::Ref(r)) if !r.is_empty() => {
                self.at += 1;
                Ok((r.clone(), pos))
            }
            _ => Err(self.expected("a weight reference like %w3")),
        }
    }

    pub fn end(&self) -> Result<(), ParseError> {
        if self.at_end() {
            Ok(())
        } else {
            Err(self.expected("the end of the line"))
        }
    }

    /// The text of the tokens up to (not including) the first one `stop` accepts, and
    /// where it starts.
    pub fn text_until(&mut self, stop: impl Fn(&Tok) -> bool) -> (&'a str, Pos) {
        let pos = self.here();
        let first = self.at;
        while self.peek().is_some_and(|t| !stop(t)) {
            self.at += 1;
        }
        let tokens = &self.line.tokens[first..self.at];
        let text = match (tokens.first(), tokens.last()) {
            (Some(a), Some(b)) => &self.line.text[a.start..b.end],
            _ => "",
        };
        (text, pos)
    }

    /// Items separated by commas, up to and including `close` (no items is fine).
    pub fn list<T>(
        &mut self,
        close: char,
        mut item: impl FnMut(&mut Self) -> Result<T, ParseError>,
    ) -> Result<Vec<T>, ParseError> {
        let mut items = Vec::new();
        if self.eat_punct(close) {
            return Ok(items);
        }
        loop {
            items.push(item(self)?);
            if self.eat_punct(close) {
                return Ok(items);
            }
            if !self.eat_punct(',') {
                return Err(self.expected(&format!("`,` or `{close}`")));
            }
        }
    }

    /// Skips the next token (the caller has looked at it).
    pub fn skip(&mut self) {
        self.at += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_strings_refs_and_comments() {
        let lines = lex("\n  a.b = Add(x, \"q \\\" r\") w=%w3 ; comment\n; only\n").unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].number, 2);
        let toks: Vec<&Tok> = lines[0].tokens.iter().map(|t| &t.tok).collect();
        assert_eq!(
            toks,
            [
                &Tok::Word("a.b".into()),
                &Tok::Punct('='),
                &Tok::Word("Add".into()),
                &Tok::Punct('('),
                &Tok::Word("x".into()),
                &Tok::Punct(','),
                &Tok::Str("q \" r".into()),
                &Tok::Punct(')'),
                &Tok::Word("w".into()),
                &Tok::Punct('='),
                &Tok::Ref("w3".into()),
            ]
        );
        assert_eq!(lines[0].tokens[2].col, 9);
        assert_eq!(lines[0].tokens[10].col, 28);
    }

    #[test]
    fn numbers_stay_whole_words() {
        let lines = lex("-0.5*%w1 1e-5 2:4").unwrap();
        let toks: Vec<&Tok> = lines[0].tokens.iter().map(|t| &t.tok).collect();
        assert_eq!(toks[0], &Tok::Word("-0.5".into()));
        assert_eq!(toks[1], &Tok::Punct('*'));
        assert_eq!(toks[3], &Tok::Word("1e-5".into()));
        assert_eq!(toks[5], &Tok::Punct(':'));
    }

    #[test]
    fn an_open_string_is_an_error() {
        let err = lex("a = \"open").err().unwrap();
        assert_eq!((err.line, err.column), (1, 5));
    }
}
